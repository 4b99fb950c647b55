-- The module's metrics as a scraper sees them: GET /metrics of a spec server (its
-- http_port, with mod_http_openmetrics loaded) and values picked out of the text.
local http = require "socket.http"
local ltn12 = require "ltn12"
local socket = require "socket"

local M = {}

--- The value of `name{host="localhost"} value` in an OpenMetrics text; nil if absent.
function M.metric(text, name)
	local pattern = "\n" .. name:gsub("[%p]", "%%%0") .. "{host=\"localhost\"} ([%d%.e+-]+)"
	local value = ("\n" .. text):match(pattern)
	return value and tonumber(value)
end

--- GET /metrics of `srv` (the http port may open a moment after the c2s port the harness
--- waits for).
function M.scrape(srv)
	local body, code
	for _ = 1, 50 do
		body = {}
		_, code = http.request{
			url = ("http://127.0.0.1:%d/metrics"):format(srv.http_port),
			sink = ltn12.sink.table(body),
		}
		if code ~= "connection refused" then break end
		socket.sleep(0.1)
	end
	assert(code == 200, "GET /metrics: " .. tostring(code))
	return table.concat(body)
end

return M
