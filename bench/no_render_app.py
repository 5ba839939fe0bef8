"""The service with its page rendering taken out, for `bench/page.py --no-render`: the unsubscribe page GET does
everything it does (SMID check, the Redis read and view count, language, the page's values, form and manager
tokens, headers) except rendering the template, which is replaced by a constant string of the page's size.
It shows how far the service would be from the baseline even if rendering cost nothing. Since no kind of page is
kept, the front (webapp/front.py) answers none of these pages: each is made from its view, in Flask."""
from webapp import create_app, pages

_PAGE = "x" * 2066  # the confirm page's size in bench/page.py


def _constant_page(_template_name, _view, *_inputs):
    return _PAGE  # keeps no kind: every page is made from its view, in Flask (the front finds none kept)


pages.render_link_page = _constant_page
app = create_app()
