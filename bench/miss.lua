-- wrk script for the miss scenario: every request is for a new /miss/<tag>-<n> path, so no
-- response can come from a cache. Run with one wrk thread (-t1) so the counter is shared:
--   wrk -t1 -c32 -d5s -s bench/miss.lua http://127.0.0.1:PORT -- TAG
local tag = "run"
local n = 0

function init(args)
    if args[1] then
        tag = args[1]
    end
end

function request()
    n = n + 1
    return wrk.format("GET", "/miss/" .. tag .. "-" .. n)
end
