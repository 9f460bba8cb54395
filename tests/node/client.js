// A real SOFA RPC client (sofa-rpc-node) for mesh's end-to-end tests.
//
//   node client.js --protocol bolt|dubbo --port N --calls JSON [--concurrency C]
//
// JSON is a list of {interface, method, args, timeout?}; every call is made
// over the client's connection to 127.0.0.1:N, C at a time. Prints one JSON
// list: {ok: value} or {error: message} per call, in order.
'use strict';

const { RpcClient } = require('sofa-rpc-node').client;

const args = process.argv.slice(2);
const opt = name => {
  const i = args.indexOf('--' + name);
  return i >= 0 ? args[i + 1] : undefined;
};
const protocolName = opt('protocol') || 'bolt';
const port = opt('port');
const calls = JSON.parse(opt('calls'));
const concurrency = Number(opt('concurrency') || 1);
const quiet = { info() {}, warn() {}, debug() {}, error() {} };

async function main() {
  const client = new RpcClient({
    logger: quiet,
    protocol: protocolName === 'dubbo' ? require('dubbo-remoting') : require('sofa-bolt-node'),
  });
  const consumers = new Map();
  const consumer = async iface => {
    if (!consumers.has(iface)) {
      const c = client.createConsumer({
        interfaceName: iface,
        version: '1.0.0',
        serverHost: '127.0.0.1:' + port,
      });
      await c.ready();
      consumers.set(iface, c);
    }
    return consumers.get(iface);
  };
  const results = new Array(calls.length);
  let next = 0;
  async function worker() {
    while (next < calls.length) {
      const i = next++;
      const call = calls[i];
      try {
        const c = await consumer(call.interface || 'com.mesh.test.Greeter');
        const v = await c.invoke(call.method, call.args || [], {
          responseTimeout: call.timeout || 5000,
        });
        results[i] = { ok: v };
      } catch (e) {
        results[i] = { error: String(e && e.message || e) };
      }
    }
  }
  await Promise.all(Array.from({ length: concurrency }, worker));
  process.stdout.write(JSON.stringify(results) + '\n');
  await client.close();
  process.exit(0);
}

main().catch(e => { console.error(e); process.exit(2); });
