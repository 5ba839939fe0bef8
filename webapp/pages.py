"""Blueprint for the pages reached from a message: /unsubscribe/<smid> (page and RFC 8058 one-click)."""
from flask import Blueprint

bp = Blueprint("pages", __name__)
