// A real SOFA RPC server (sofa-rpc-node) for mesh's end-to-end tests.
//
//   node server.js --protocol bolt|dubbo --name NAME
//
// Serves interface com.mesh.test.Greeter (version 1.0.0) with
// whoami() -> NAME, plus(a, b), echo(s), sleep(ms), fail(msg).
// Prints {"port": N} on stdout once listening; stops on SIGTERM.
'use strict';

const { RpcServer } = require('sofa-rpc-node').server;

const args = process.argv.slice(2);
const opt = name => {
  const i = args.indexOf('--' + name);
  return i >= 0 ? args[i + 1] : undefined;
};
const protocolName = opt('protocol') || 'bolt';
const name = opt('name') || 'server';
const quiet = { info() {}, warn() {}, debug() {}, error: console.error };

const server = new RpcServer({
  logger: quiet,
  port: 0,
  protocol: protocolName === 'dubbo' ? require('dubbo-remoting') : require('sofa-bolt-node'),
});

let calls = 0;
const impl = {
  async whoami() { calls++; return name; },
  async plus(a, b) { calls++; return a + b; },
  async echo(s) { calls++; return s; },
  async sleep(ms) { calls++; await new Promise(r => setTimeout(r, ms)); return 'slept'; },
  async fail(msg) { calls++; throw new Error(msg); },
  async calls() { return calls; },
};
server.addService({ interfaceName: 'com.mesh.test.Greeter', version: '1.0.0' }, impl);
server.addService({ interfaceName: 'com.mesh.test.Other', version: '1.0.0' }, impl);

server.on('listening', () => {
  const port = server._servers[0].address().port;
  process.stdout.write(JSON.stringify({ port }) + '\n');
});
server.start();
process.on('SIGTERM', () => process.exit(0));
