-- wrk script: POST /v1/predict with texts cycled from bench/texts.txt (one per line).
local texts = {}
for line in io.lines(os.getenv("BENCH_TEXTS") or "bench/texts.txt") do
  texts[#texts + 1] = line
end
local i = 0
local function escape(s)
  return (s:gsub('\\', '\\\\'):gsub('"', '\\"'))
end
request = function()
  i = i % #texts + 1
  return wrk.format("POST", "/v1/predict", {["Content-Type"] = "application/json"},
                    '{"text": "' .. escape(texts[i]) .. '"}')
end
