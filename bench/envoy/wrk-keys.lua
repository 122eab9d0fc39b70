-- wrk script for bench/filters.sh: requests with a sticky key header that
-- cycles over distinct users (requests are formatted once in init, so
-- per-request work in wrk stays a table lookup).
--
-- Without REQUESTS: GET BENCH_PATH with KEY_HEADER: user-N, N < KEYS.
-- With REQUESTS=FILE: line N of FILE is `METHOD<TAB>PATH[<TAB>BODY]` and is
-- sent with KEY_HEADER: user-N (and content-type: application/json when it
-- has a body); the same file format `bench-tools paced --requests` reads.
local keys = tonumber(os.getenv("KEYS") or "1000")
local path = os.getenv("BENCH_PATH") or "/v2/models/digits-mlp/infer"
local header = os.getenv("KEY_HEADER") or "x-user-id"
local requests_file = os.getenv("REQUESTS")
local reqs = {}
local i = 0

local function from_file(file)
  local f = assert(io.open(file, "r"), "cannot open REQUESTS file " .. file)
  local k = 0
  for line in f:lines() do
    if line ~= "" then
      local t1 = string.find(line, "\t", 1, true)
      assert(t1, "REQUESTS line " .. (k + 1) .. ": want METHOD<TAB>PATH[<TAB>BODY]")
      local method = string.sub(line, 1, t1 - 1)
      local rest = string.sub(line, t1 + 1)
      local t2 = string.find(rest, "\t", 1, true)
      local headers = { [header] = "user-" .. k }
      local req
      if t2 then
        headers["content-type"] = "application/json"
        -- wrk.format adds content-length for a body.
        req = wrk.format(method, string.sub(rest, 1, t2 - 1), headers, string.sub(rest, t2 + 1))
      else
        req = wrk.format(method, rest, headers)
      end
      k = k + 1
      reqs[k] = req
    end
  end
  f:close()
  assert(k > 0, "REQUESTS file " .. file .. " has no requests")
  return k
end

function init(args)
  if requests_file and requests_file ~= "" then
    keys = from_file(requests_file)
    return
  end
  for k = 0, keys - 1 do
    reqs[k + 1] = wrk.format("GET", path, { [header] = "user-" .. k })
  end
end

function request()
  i = i % keys + 1
  return reqs[i]
end
