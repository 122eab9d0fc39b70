-- wrk script for bench/filters.sh: GET the OIP infer path with a sticky
-- key header that cycles over KEYS distinct users (requests are formatted
-- once in init, so per-request work in wrk stays a table lookup).
local keys = tonumber(os.getenv("KEYS") or "1000")
local path = os.getenv("BENCH_PATH") or "/v2/models/digits-mlp/infer"
local header = os.getenv("KEY_HEADER") or "x-user-id"
local reqs = {}
local i = 0

function init(args)
  for k = 0, keys - 1 do
    reqs[k + 1] = wrk.format("GET", path, { [header] = "user-" .. k })
  end
end

function request()
  i = i % keys + 1
  return reqs[i]
end
