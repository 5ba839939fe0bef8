"""The OpenAPI 3.1 document of the sending-platform API, built from one table of endpoints."""
from .resources import MAX_CATEGORIES, MAX_CHANNELS, MAX_FIELDS, MAX_LINE_LENGTH
from .validation import API_NAME_MAX_LENGTH

ENVELOPE = {
    "type": "object",
    "required": ["error", "error_text"],
    "properties": {"error": {"type": "integer"}, "error_text": {"type": "string"}, "data": {}},
}
TOKEN = {"type": "string", "description": "API token (or send Authorization: Bearer)"}
ID = {"type": "integer", "minimum": 1, "maximum": 2 ** 31}
# What validation.as_profile_id takes.
PROFILE_ID = {"type": "string", "pattern": r"^[A-Za-z0-9._:@-]+$", "minLength": 1, "maxLength": 40}
CHANNEL = {"type": "string", "examples": ["email", "sms", "push", "telegram_bot", "whatsapp", "viber", "notify"]}
STATUS = {"oneOf": [{"type": "string", "enum": ["subscribed", "unsubscribed", "complained", "hardbounced",
                                                 "unconfirmed", "suspended", "invalid"]},
                    {"type": "integer", "minimum": 0, "maximum": 6}]}
# What validation.as_api_name takes: a category's or custom field's name in the API.
API_NAME = {"type": "string", "pattern": "^[A-Za-z][A-Za-z0-9_]*$", "maxLength": API_NAME_MAX_LENGTH}
# A `line` field's value (maxLength binds only strings: an int, float or bool field's value is not one).
LINE_VALUE = {"maxLength": MAX_LINE_LENGTH}
FIELD = {"type": "object", "required": ["api_name", "type"], "properties": {
    "title": {"type": "string"}, "api_name": API_NAME,
    "type": {"enum": ["int", "float", "line", "bool"]}, "default": LINE_VALUE, "required": {"type": "boolean"},
    "in_manager": {"type": "boolean"}}}
CATEGORY = {"type": "object", "required": ["api_name"], "properties": {
    "title": {"type": "string"}, "api_name": API_NAME,
    "in_manager": {"type": "boolean"}, "required": {"type": "boolean"}}}
RESOURCE_BODY = {
    "name": {"type": "string"}, "description": {"type": "string"}, "url": {"type": ["string", "null"]},
    "urls": {"type": "array", "items": {"type": "string", "format": "uri"}},
    "dbs_ids": {"type": "array", "items": ID}, "trk_domain": {"type": ["string", "null"]},
    "increase_priority": {"type": "boolean"}, "default_locale": {"enum": ["en", "ru", None]},
    "categories": {"type": "array", "maxItems": MAX_CATEGORIES, "items": CATEGORY},
    "channels": {"type": "array", "maxItems": MAX_CHANNELS, "items": CHANNEL},
    "channel_settings": {"type": "object", "additionalProperties": {
        "type": "object", "properties": {
            "fields": {"type": "array", "maxItems": MAX_FIELDS, "items": FIELD},
            "delete_fields": {"type": "array", "items": API_NAME},
            "providers": {"type": "array", "maxItems": 32,
                          "items": {"type": "string", "minLength": 1, "maxLength": 64},
                          "description": "push only: the providers a push subscription may name (any when empty)"}}}},
    "unsubscribe": {"type": "object", "properties": {
        "mode": {"enum": ["instant", "confirm", "blocked", "delayed"]},
        "timer_minutes": {"type": "integer", "minimum": 1, "maximum": 30},
        "page_url": {"type": ["string", "null"], "pattern": r"\{send_message_id\}",
                     "description": "absolute http(s) URL; must contain {send_message_id}, may contain "
                                    "{resource_token}"},
        "blocked_text": {"type": ["string", "null"]},
        "list_unsubscribe": {"type": "object", "properties": {
            "enabled": {"type": "boolean"}, "called_url": {"type": ["string", "null"]}}}}},
}
SUBSCRIPTION_ID = {
    "db_id": ID, "profile_id": PROFILE_ID, "resource_id": ID, "channel": CHANNEL,
    "email": {"type": "string", "format": "email"}, "phone": {"type": "string", "pattern": r"^\+[1-9][0-9]{6,14}$"},
    "provider": {"type": "string"}, "subscription_id": {"type": "string"},
    "cc_data": {"type": "object", "properties": {"id": {"type": ["integer", "string"]}, "phone": {"type": "string"}}},
}
CUSTOM_FIELDS = {"type": "object", "additionalProperties": LINE_VALUE,
                 "description": "the channel's custom fields by api_name, and its standard fields (push: "
                                "_browser_name and _device_type, text)"}
SUBSCRIPTION_SET = {**SUBSCRIPTION_ID, "status": STATUS,
                    "priority": {"type": "integer", "minimum": 0, "maximum": 2 ** 31},
                    "locale": {"type": "string", "pattern": r"^([A-Za-z]{2,3}([-_][A-Za-z0-9]{1,8})*)?$"},
                    "cats": {"type": "array", "maxItems": MAX_CATEGORIES, "items": {"type": "string"}},
                    "custom_fields": CUSTOM_FIELDS,
                    # null (and "") mean not given, as platforms send them
                    "date": {"type": ["string", "null"], "format": "date-time"}, "ip": {"type": ["string", "null"]},
                    "url": {"type": ["string", "null"]}}
LINK_MESSAGE = {**SUBSCRIPTION_ID, "category": API_NAME,
                "sent_at": {"type": "integer", "description": "unix seconds; default now"}}
SCOPE = {"db_id": ID, "profile_id": PROFILE_ID, "resource_id": ID, "channel": CHANNEL}
# A resource is named by `id` or, as the other endpoints name it, `resource_id`: both only when they agree.
RESOURCE_NAMED = {"id": ID, "resource_id": {**ID, "description": "the same as id; when both are given, equal"}}

# path -> (summary, body properties, required)
ENDPOINTS = {
    "resources/add": ("Create a resource", RESOURCE_BODY, ["name", "channels"]),
    "resources/update": ("Change a resource (partial; api_names fixed)",
                         {**RESOURCE_NAMED, **RESOURCE_BODY, "delete_categories": {"type": "array", "items": API_NAME},
                          "regenerate_rtoken": {"type": "boolean"}}, ["id"]),
    "resources/get": ("One resource with id, rtoken, sdk_script_url and called_url_delivery (the call URL's "
                      "delivery state as webhooks/list shows a webhook's, or null)", RESOURCE_NAMED, ["id"]),
    "resources/list": ("Resources paged by from_id/limit",
                       {"from_id": {"type": "integer", "minimum": 0},
                        "limit": {"type": "integer", "minimum": 1, "maximum": 100}}, []),
    "resources/delete": ("Delete a resource", RESOURCE_NAMED, ["id"]),
    "resources/fields_get": ("Field descriptors of a channel", {**RESOURCE_NAMED, "channel": CHANNEL},
                             ["id", "channel"]),
    "subscriptions/set": ("Add or edit a subscription", SUBSCRIPTION_SET,
                          ["db_id", "profile_id", "resource_id", "channel"]),
    "subscriptions/get": ("One subscription, extended form", SUBSCRIPTION_ID,
                          ["db_id", "profile_id", "resource_id", "channel"]),
    "subscriptions/list": ("All subscriptions of a profile", SCOPE, ["db_id", "profile_id"]),
    "subscriptions/delete": ("Soft delete (is_delete: true)", SUBSCRIPTION_ID,
                             ["db_id", "profile_id", "resource_id", "channel"]),
    "subscriptions/undelete": ("Undo a soft delete", SUBSCRIPTION_ID,
                               ["db_id", "profile_id", "resource_id", "channel"]),
    "subscriptions/suspend_all": ("Suspend subscribed subscriptions; count in `updated`", SCOPE, ["db_id"]),
    "subscriptions/unsuspend_all": ("Resume suspended subscriptions; count in `updated`", SCOPE, ["db_id"]),
    "messages/links": ("SMID, URLs and List-* headers for one message (writes nothing)", LINK_MESSAGE,
                       ["db_id", "profile_id", "resource_id", "channel"]),
    "messages/links_bulk": ("Links for up to 1000 messages, in order",
                            {"messages": {"type": "array", "minItems": 1, "maxItems": 1000,
                                          "items": {"type": "object", "properties": LINK_MESSAGE,
                                                    "additionalProperties": False}}},
                            ["messages"]),
    "profiles/message_unsub": ("Unsubscribe the SMID's subscription now (only `categories` when given); "
                               "profile_id is returned top-level",
                               {"smid": {"type": "string"}, "rtoken": {"type": "string"},
                                "categories": {"type": "array", "items": {"type": "string"}}},
                               ["smid", "rtoken"]),
    "events/list": ("One profile's events, newest first, paged by from_id (seq)/limit",
                    {"db_id": ID, "profile_id": PROFILE_ID, "from_id": {"type": "integer", "minimum": 1},
                     "limit": {"type": "integer", "minimum": 1, "maximum": 500}}, ["db_id", "profile_id"]),
    "events/export": ("Events in a time range as JSON lines (application/x-ndjson)",
                      {"from": {"type": ["string", "integer"]}, "to": {"type": ["string", "integer"]}}, []),
    "events/verify": ("Walk the hash chains; `first_bad` names the first entry that does not match",
                      {"db_id": ID, "profile_id": PROFILE_ID}, []),
    "events/flagged": ("Changes that look automated (fast, HEAD, GET burst, domain burst) in a range",
                       {"from": {"type": ["string", "integer"]}, "to": {"type": ["string", "integer"]},
                        "domain_burst": {"type": "integer"}, "domain_window": {"type": "integer"}}, []),
    "events/revert_flagged": ("Revert flagged changes (all in the range, or `ids`) to their before-state",
                              {"from": {"type": ["string", "integer"]}, "to": {"type": ["string", "integer"]},
                               "ids": {"type": "array", "items": {"type": "string"}},
                               "domain_burst": {"type": "integer"}, "domain_window": {"type": "integer"}}, []),
    "webhooks/add": ("A webhook target: every event (of one resource) is POSTed, signed with the secret",
                     {"url": {"type": "string"}, "resource_id": ID,
                      "secret": {"type": "string", "minLength": 16, "maxLength": 256}},
                     ["url"]),
    "webhooks/list": ("Webhooks with last error, last success and backlog (the secret masked whole)", {}, []),
    "webhooks/delete": ("Remove a webhook", {"id": ID}, ["id"]),
}


JSON_LINES = ("events/export",)  # answered as one JSON object per line, not the envelope


def register_endpoint(path, summary, properties, required):
    """Let other modules (pages, events, webhooks) describe the endpoints they add."""
    ENDPOINTS[path] = (summary, properties, required)


def build_spec(base_url):
    paths = {}
    for path, (summary, props, required) in ENDPOINTS.items():
        # Every endpoint refuses a field it does not know (400), as it refuses a value of the wrong type.
        schema = {"type": "object", "properties": {"token": TOKEN, **props}, "required": required,
                  "additionalProperties": False}
        paths[f"/api/v1.1/{path}"] = {"post": {
            "summary": summary,
            "operationId": path.replace("/", "_"),
            "security": [{"bearer": []}, {}],
            "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
            "responses": {
                "200": {"description": "Successful operation",
                        "content": {"application/json": {"schema": ENVELOPE}} if path not in JSON_LINES else
                        {"application/x-ndjson": {"schema": {"type": "string"}}}},
                "4XX": {"description": "Error envelope with a readable error_text",
                        "content": {"application/json": {"schema": ENVELOPE}}},
            },
        }}
    return {
        "openapi": "3.1.0",
        "info": {"title": "Unsubscribe service API", "version": "1.1"},
        "servers": [{"url": base_url}],
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "paths": paths,
    }
