// Streams generated text from a shardline coordinator.
// usage: node generate.js [HOST:PORT] [PROMPT] [MAX_TOKENS]
const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const protos = path.join(__dirname, "..", "..", "protos");
const definition = protoLoader.loadSync("shardline/v1/coordinator.proto", {
  includeDirs: [protos], keepCase: true, longs: Number, enums: String, defaults: true,
});
const { Coordinator } = grpc.loadPackageDefinition(definition).shardline.v1;

const [endpoint = "127.0.0.1:50051", prompt = "The capital of France is", maxTokens = "16"] = process.argv.slice(2);
const client = new Coordinator(endpoint, grpc.credentials.createInsecure());
const call = client.Generate({ prompt, max_tokens: Number(maxTokens), temperature: 0 },
                             { deadline: Date.now() + 120000 });
call.on("data", (response) => {
  process.stdout.write(response.text);
  if (response.finish_reason !== "FINISH_REASON_UNSPECIFIED") {
    process.stderr.write(`\n[${response.finish_reason}: ${response.usage.completion_tokens} tokens]\n`);
  }
});
call.on("error", (err) => { console.error(`error: ${err.code} ${err.details}`); process.exit(1); });
call.on("end", () => process.stdout.write("\n"));
