"""Domain errors. Core modules raise these; each blueprint maps them to its own kind of answer once.

`status` is the HTTP status a web surface should use; `code` is the Altcraft-style envelope `error` number.
"""


class ServiceError(Exception):
    status = 400
    code = 400

    def __init__(self, message, field=None):
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidInput(ServiceError):
    """A request value breaks a validation rule (the message names the field and the rule)."""


class InvalidFields(InvalidInput):
    """Several form fields are wrong at once; `errors` maps field name -> message (shown inline)."""

    def __init__(self, errors):
        super().__init__("; ".join(f"{k}: {v}" for k, v in errors.items()), field=next(iter(errors), None))
        self.errors = errors


class NotAuthorized(ServiceError):
    """Missing or wrong API token."""
    status = 401
    code = 401


class Forbidden(ServiceError):
    """The caller is known but may not do this (wrong rtoken, origin not allowed)."""
    status = 403
    code = 403


class NotFound(ServiceError):
    status = 404
    code = 404


class NoSuchResource(NotFound):
    pass


class NoSuchSubscription(NotFound):
    pass


class BadToken(NotFound):
    """A SMID or manager token that is forged, truncated, altered or signed with an unknown key."""


class IncompleteToken(BadToken):
    """A token cut short (a link broken where a mail client wrapped the line): what it has begins as a token of
    its kind does, signed with a listed key, and its record needs more than it has."""


class Blocked(Forbidden):
    """The resource does not let people unsubscribe."""


class Conflict(ServiceError):
    """The change is not possible in the subscription's current state."""
    status = 409
    code = 409


_reported_broken = set()  # what report_broken has logged in this process


def report_broken(logger, what, message, *args):
    """Log stored data that cannot be used, once per process for each `what`: the sweepers meet it again on every
    pass (it stays for a person to look at), and one line is enough. Bounded, so a flood cannot grow memory."""
    if what not in _reported_broken and len(_reported_broken) < 10000:
        _reported_broken.add(what)
        logger.error(message, *args)


class DamagedData(ValueError):
    """Stored text that is not what the service writes there (edited in Redis by hand, or damaged storage): a
    subscription record (subscriptions.DamagedRecord) or a resource (resources.DamagedResource)."""


def or_none_if_damaged(decode, raw, logger, where):
    """decode(raw), or None, logged with `where`, for DamagedData: its readers take it as missing."""
    try:
        return decode(raw)
    except DamagedData as exc:
        logger.warning("%s (%s): taken as missing", exc, where)
        return None
