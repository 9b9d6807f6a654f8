-- wrk script: POST /v1/predict/batch with BENCH_BATCH texts per request, cycled from BENCH_TEXTS.
local texts = {}
for line in io.lines(os.getenv("BENCH_TEXTS") or "bench/texts.txt") do
  texts[#texts + 1] = line
end
local size = tonumber(os.getenv("BENCH_BATCH") or "64")
local i = 0
local function escape(s)
  return (s:gsub('\\', '\\\\'):gsub('"', '\\"'))
end
request = function()
  local items = {}
  for k = 1, size do
    i = i % #texts + 1
    items[k] = '"' .. escape(texts[i]) .. '"'
  end
  return wrk.format("POST", "/v1/predict/batch", {["Content-Type"] = "application/json"},
                    '{"texts": [' .. table.concat(items, ",") .. ']}')
end
