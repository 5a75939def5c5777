-- wrk script for bench/throughput.py: the same request for every target, and a machine-readable result.
--
--   wrk ... -s load.lua URL -- HOST CONNECTION COUNT_STATUSES [TOKEN | @TOKENS_FILE THREADS]
--
-- HOST            the Host header every target gets (the URL names the same host, so TLS SNI matches it)
-- CONNECTION      "keep-alive" or "close" (sent as a Connection header)
-- COUNT_STATUSES  "1": count every response whose status is not 2xx (wrk itself only counts >= 400)
-- TOKEN           a bearer token sent with every request ("-" for none)
-- @TOKENS_FILE    one token per line: thread i of THREADS sends lines i, i+THREADS, ... each once, in
--                 order, and stops after that pass (the cold-cache run: every request a new token
--                 and a new device)
--
-- done() prints one line "WRK-RESULT {json}" that the bench parses (durations in microseconds).

-- The URL's host is a protected host name that need not resolve: connect to 127.0.0.1 whatever it
-- says, so the TLS SNI and Host are what a real client sends without touching /etc/hosts.
wrk.resolve = function(host, service)
   wrk.addrs = wrk.lookup("127.0.0.1", service)
end

local threads = {}

function setup(thread)
   thread:set("thread_index", #threads)
   table.insert(threads, thread)
end

local function read_tokens(path, index, count)
   local mine, line_number = {}, 0
   for line in io.lines(path) do
      if line ~= "" then
         if line_number % count == index then
            table.insert(mine, line)
         end
         line_number = line_number + 1
      end
   end
   return mine
end

local requests, next_request = {}, 1
local count_statuses, check_close, done_file = false, false, nil
responses, non2xx, kept_open, stopped_after = 0, 0, 0, 0

function init(args)
   wrk.headers["Host"] = args[1]
   wrk.headers["Connection"] = args[2]
   wrk.headers["Accept"] = "application/json"
   wrk.headers["User-Agent"] = "Outlook-iOS-Android/1.0"
   count_statuses = args[3] == "1"
   check_close = args[2] == "close"
   local token = args[4] or "-"
   if token:sub(1, 1) == "@" then
      for _, each in ipairs(read_tokens(token:sub(2), thread_index, tonumber(args[5]))) do
         wrk.headers["Authorization"] = "Bearer " .. each
         table.insert(requests, wrk.format())
      end
      stopped_after = #requests
      done_file = args[6] .. thread_index
      count_statuses = true
   else
      if token ~= "-" then
         wrk.headers["Authorization"] = "Bearer " .. token
      end
      request = nil  -- one static request: wrk formats it once and skips calling Lua per request
   end
   if not count_statuses and not check_close then
      response = nil  -- wrk skips parsing headers and bodies for Lua when there is no response()
   end
end

function request()
   local chosen = requests[next_request]
   next_request = next_request % #requests + 1
   return chosen
end

local function says_close(headers)
   for name, value in pairs(headers) do
      if name:lower() == "connection" and value:lower():find("close", 1, true) then
         return true
      end
   end
   return false
end

function response(status, headers, body)
   responses = responses + 1
   if status < 200 or status > 299 then
      non2xx = non2xx + 1
   end
   if check_close and not says_close(headers) then
      kept_open = kept_open + 1
   end
   if stopped_after > 0 and responses == stopped_after then
      local marker = io.open(done_file, "w")
      marker:write("done\n")
      marker:close()
      wrk.thread:stop()
   end
end

function done(summary, latency, requests_stats)
   local counted, non_2xx, open = 0, 0, 0
   for _, thread in ipairs(threads) do
      counted = counted + (thread:get("responses") or 0)
      non_2xx = non_2xx + (thread:get("non2xx") or 0)
      open = open + (thread:get("kept_open") or 0)
   end
   local e = summary.errors
   io.write(string.format(
      'WRK-RESULT {"requests": %d, "duration_us": %d, "bytes": %d, "connect": %d, "read": %d, "write": %d, '
      .. '"status": %d, "timeout": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d, '
      .. '"counted": %d, "non2xx": %d, "kept_open": %d}\n',
      summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, counted, non_2xx,
      open))
end
