"""Every string on the pages has a Russian translation, and the compiled catalog matches its source."""
import io
import os

from babel.messages.extract import extract_from_dir
from babel.messages.mofile import read_mo
from babel.messages.pofile import read_po

from conftest import ROOT

PO = os.path.join(ROOT, "webapp", "translations", "ru", "LC_MESSAGES", "messages.po")
KEYWORDS = {"_": None, "gettext": None, "ngettext": (1, 2)}
METHODS = [("templates/**.html", "jinja2"), ("webapp/**.py", "python")]


def extracted_ids():
    ids = set()
    for _fn, _line, message, _comments, _ctx in extract_from_dir(ROOT, METHODS, keywords=KEYWORDS,
                                                                  options_map={"templates/**.html": {}}):
        ids.add(message[0] if isinstance(message, tuple) else message)
    return ids


def test_every_page_string_is_translated_to_russian():
    with open(PO, "rb") as f:
        catalog = read_po(f, locale="ru")
    ids = extracted_ids()
    assert len(ids) > 40
    missing = sorted(i for i in ids if not catalog.get(i) or not catalog.get(i).string
                     or (isinstance(catalog.get(i).string, tuple) and not all(catalog.get(i).string)))
    assert missing == [], "run pybabel extract/update and translate: " + "; ".join(missing)


def test_compiled_catalog_is_up_to_date():
    with open(PO, "rb") as f:
        source = read_po(f, locale="ru")
    with open(PO.replace(".po", ".mo"), "rb") as f:
        compiled = read_mo(f)
    def as_dict(catalog):
        return {tuple(m.id) if isinstance(m.id, (list, tuple)) else m.id:
                tuple(m.string) if isinstance(m.string, (list, tuple)) else m.string for m in catalog if m.id}
    assert as_dict(source) == as_dict(compiled)
