// A smartroute plugin in Node.js (no npm packages): requests name their tenant.
//
//   SmartRoute(routes, plugins=[{"name": "tenants", "command": ["node", "tenant_router.js"]}])
//
// The protocol, as this file speaks it:
//
// - stdin/stdout carry one JSON object per line. smartroute writes
//   {"method": "configure", "params": {"routes": [{"name": ..., ...}, ...]}}; the plugin opens
//   a Unix socket and answers {"method": "ready", "params": {"socket": PATH, "hooks": [...]}}.
//   Later it may write, at any time, "log", "set_targets" and "set_speed" lines (push below).
// - Hook calls come over the socket. Each frame is a 4-byte big-endian length and that many
//   bytes of UTF-8 JSON: {"hook": "on_request", "route": NAME, "data": {"context": {...},
//   "request": {"method", "path", "query", "headers": [[name, value], ...]}}}. The reply is a
//   frame with a verdict ({} says nothing); on_disconnect expects no reply.
// - When stdin closes smartroute is gone: the plugin exits.
//
// What it does: a request with "X-Tenant: NAME" reaches its backend with "X-Tenant-Seen: NAME";
// "X-Tenant: blocked" is refused with 403. It counts the connections that ended and logs the
// count. Started with PUSH_TARGETS=route:host:port it points that route at host:port, and with
// PUSH_SPEED=route:bytes_per_s it limits the route's downloads to that speed.
"use strict";

const fs = require("node:fs");
const net = require("node:net");
const os = require("node:os");
const path = require("node:path");
const readline = require("node:readline");

const folder = fs.mkdtempSync(path.join(os.tmpdir(), "tenant-router-"));
const socketPath = path.join(folder, "plugin.sock");
let disconnects = 0;

function push(method, params) {
  process.stdout.write(JSON.stringify({ method, params }) + "\n");
}

function decide(call) {
  if (call.hook !== "on_request") return {};
  const header = call.data.request.headers.find(([name]) => name.toLowerCase() === "x-tenant");
  if (header === undefined) return {};
  const tenant = header[1];
  if (tenant === "blocked") {
    return { allow: false, status: 403, body: "this tenant is blocked\n" };
  }
  return { set_headers: { "X-Tenant-Seen": tenant } };
}

// One connection from smartroute: frames in, one reply frame per call (but on_disconnect).
function serve(conn) {
  let pending = Buffer.alloc(0);
  conn.on("data", (chunk) => {
    pending = Buffer.concat([pending, chunk]);
    while (pending.length >= 4 && pending.length >= 4 + pending.readUInt32BE(0)) {
      const size = pending.readUInt32BE(0);
      const call = JSON.parse(pending.subarray(4, 4 + size).toString("utf8"));
      pending = pending.subarray(4 + size);
      if (call.hook === "on_disconnect") {
        disconnects += 1;
        push("log", { level: "info", message: `connections ended: ${disconnects}` });
        continue;
      }
      const reply = Buffer.from(JSON.stringify(decide(call)), "utf8");
      const head = Buffer.alloc(4);
      head.writeUInt32BE(reply.length, 0);
      conn.write(Buffer.concat([head, reply]));
    }
  });
  conn.on("error", () => conn.destroy());
}

function pushAtStart() {
  if (process.env.PUSH_TARGETS) {
    const [route, host, port] = process.env.PUSH_TARGETS.split(":");
    push("set_targets", { route, targets: [{ host, port: Number(port) }] });
  }
  if (process.env.PUSH_SPEED) {
    const [route, rate] = process.env.PUSH_SPEED.split(":");
    push("set_speed", { route, download: Number(rate) });
  }
}

const stdin = readline.createInterface({ input: process.stdin });
stdin.once("line", (line) => {
  const routes = JSON.parse(line).params.routes.map((route) => route.name);
  net.createServer(serve).listen(socketPath, () => {
    push("log", { level: "info", message: `routing tenants for ${routes.join(", ") || "no route"}` });
    push("ready", { socket: socketPath, hooks: ["on_connect", "on_request", "on_disconnect"] });
    pushAtStart();
  });
});
stdin.on("close", () => process.exit(0)); // smartroute is gone
process.on("SIGTERM", () => process.exit(0)); // smartroute stops it
process.on("exit", () => fs.rmSync(folder, { recursive: true, force: true }));
