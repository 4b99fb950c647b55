-- Benchmark sessions whose streams are scanned for a body marker instead of parsed, so the
-- client side stays cheap while the server is busy (spec/bench/e2e.lua, queries.lua).
local socket = require "socket"

local M = {}

--- A session of `client` to count marked messages on (`want`: how many it is to get).
function M.counter(client, want)
	return { client = client, sock = client.sock, count = 0, tail = "", want = want }
end

--- Reads what is there (waiting up to `timeout` seconds for any) on the sessions of
--- `counters` (`by_sock`: socket -> counter) and counts each `mark` in their streams.
function M.pump(counters, by_sock, timeout, mark)
	local socks = {}
	for i, c in ipairs(counters) do socks[i] = c.sock end
	local readable = socket.select(socks, nil, timeout)
	for _, s in ipairs(readable) do
		local c = by_sock[s]
		s:settimeout(0)
		local data, err, partial = s:receive(65536)
		data = data or partial
		if data and #data > 0 then
			local chunk = c.tail .. data
			local from = 1
			while true do
				local i = chunk:find(mark, from, true)
				if not i then break end
				c.count = c.count + 1
				from = i + #mark
			end
			c.tail = chunk:sub(-(#mark - 1))
		end
		if err == "closed" then error("a benchmark session was disconnected") end
	end
end

return M
