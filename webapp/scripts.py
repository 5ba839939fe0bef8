"""Lua scripts for multi-key steps done in one round trip. Each lists its KEYS and ARGV."""

# KEYS[i]: a profile's subscriptions hash; ARGV[i]: a hash_id. Returns a string of "1"/"0", one per pair.
# One EVAL instead of a pipeline of N HEXISTS: packing and parsing 1000 replies cost more than the lookups.
SUBSCRIPTIONS_EXIST = """
local out = {}
for i = 1, #KEYS do
  out[i] = redis.call('HEXISTS', KEYS[i], ARGV[i]) == 1 and '1' or '0'
end
return table.concat(out)
"""


def subscriptions_exist(r, pairs):
    """[(subs_key, hash_id)] -> [bool]; read-only."""
    if not pairs:
        return []
    flags = r.eval_ro(SUBSCRIPTIONS_EXIST, len(pairs), *[k for k, _ in pairs], *[h for _, h in pairs])
    return [c == "1" for c in flags]
