// Streams generated text from a shardline coordinator (greedy: temperature 0).
// usage: node generate.js [HOST:PORT] [PROMPT] [MAX_TOKENS]
//
// Plaintext unless SHARDLINE_CA is set. Security comes from the environment (so a key never shows in `ps`):
//   SHARDLINE_CA=path/to/ca.crt        TLS, trusting this CA (`coordinator launch --secure` prints its path)
//   SHARDLINE_CLIENT_CERT=... and SHARDLINE_CLIENT_KEY=...   a client certificate and its key (mutual TLS)
//   SHARDLINE_API_KEY=sl_...           sent as `authorization: Bearer <key>` on the call
// e.g. with D the directory `coordinator launch --secure` prints:
//   SHARDLINE_CA=$D/ca.crt SHARDLINE_API_KEY=$(cat $D/admin.key) node generate.js 127.0.0.1:50051 "Hello" 16
// Text goes to stdout, the finish reason and token count to stderr. A failure prints
// `error: <CODE NAME> <details>` (e.g. `error: UNAUTHENTICATED ...`) on stderr and exits 1.
const fs = require("fs");
const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

function fail(message) {
  console.error(`error: ${message}`);
  process.exit(1);
}

function read(variable) {
  const file = process.env[variable];
  if (!file) return null;
  try {
    return fs.readFileSync(file);
  } catch (err) {
    return fail(`cannot read ${variable} (${file}): ${err.message}`);
  }
}

function credentials() {
  const ca = read("SHARDLINE_CA");
  const cert = read("SHARDLINE_CLIENT_CERT");
  const key = read("SHARDLINE_CLIENT_KEY");
  if (!ca) {
    if (cert || key) fail("SHARDLINE_CLIENT_CERT and SHARDLINE_CLIENT_KEY need SHARDLINE_CA (TLS)");
    return grpc.credentials.createInsecure();
  }
  if (!cert !== !key) fail("a client certificate needs its key: set both SHARDLINE_CLIENT_CERT and SHARDLINE_CLIENT_KEY");
  return grpc.credentials.createSsl(ca, key, cert);
}

function metadata() {
  const metadata = new grpc.Metadata();
  const key = process.env.SHARDLINE_API_KEY;
  if (key !== undefined && key !== "") {
    // checked here so that grpc-js never echoes a bad key in its own error message
    if (!/^[\x21-\x7e]+$/.test(key)) fail("SHARDLINE_API_KEY must be one word of printable ASCII characters");
    metadata.set("authorization", `Bearer ${key}`);
  }
  return metadata;
}

// grpc-js sends the target's host as the TLS server name even when it is an IP address, and Node warns about
// that (DEP0123) on stderr (grpc/grpc-node#1919). The certificate check is unaffected: drop just that warning.
const printWarning = process.listeners("warning");
process.removeAllListeners("warning");
process.on("warning", (warning) => {
  if (warning.code !== "DEP0123") printWarning.forEach((print) => print(warning));
});

const codeName = (code) => Object.keys(grpc.status).find((name) => grpc.status[name] === code) || `code ${code}`;

const protos = path.join(__dirname, "..", "..", "protos");
const definition = protoLoader.loadSync("shardline/v1/coordinator.proto", {
  includeDirs: [protos], keepCase: true, longs: Number, enums: String, defaults: true,
});
const { Coordinator } = grpc.loadPackageDefinition(definition).shardline.v1;

const [endpoint = "127.0.0.1:50051", prompt = "The capital of France is", maxTokens = "16"] = process.argv.slice(2);
const client = new Coordinator(endpoint, credentials());
const call = client.Generate({ prompt, max_tokens: Number(maxTokens), temperature: 0 }, metadata(),
                             { deadline: Date.now() + 120000 });
call.on("data", (response) => {
  process.stdout.write(response.text);
  if (response.finish_reason !== "FINISH_REASON_UNSPECIFIED") {
    process.stderr.write(`\n[${response.finish_reason}: ${response.usage.completion_tokens} tokens]\n`);
  }
});
call.on("error", (err) => {
  const untrusted = err.code === grpc.status.UNAVAILABLE && /certificate/i.test(err.details);
  fail(`${codeName(err.code)} ${err.details}` +
       (untrusted ? " (TLS: the server's certificate is not signed by SHARDLINE_CA, or not for this host)" : ""));
});
call.on("end", () => { process.stdout.write("\n"); client.close(); });
