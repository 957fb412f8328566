// The official TypeScript SDK client (Client + StreamableHTTPClientTransport), one action per run.
// Used by tests/kit/nodekit.py.
//
//   MCP_TOKEN=... node client.mjs URL [--timeout-ms N] [--header 'Name: value']... [--terminate] ACTION
//
//   ACTION  list                 -> {"tools": [names...]}
//           call NAME JSONARGS   -> {"result": CallToolResult} or {"error": "...", "code": N|null}
//
// Every request carries `Authorization: Bearer $MCP_TOKEN` (when MCP_TOKEN is set). One JSON line
// on stdout, exit 0, once connected. A failure to connect (initialize refused, HTTP error,
// unreachable, timeout) exits 2 with its message on stderr. The token is never printed: every
// text that leaves this process has it replaced by <redacted>. Errors the transport reported
// without failing the action (an answer with an unknown id, an SSE event that is not JSON-RPC...)
// are listed under "transport_errors".
import process from 'node:process';

import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import { StreamableHTTPClientTransport } from '@modelcontextprotocol/sdk/client/streamableHttp.js';

const token = process.env.MCP_TOKEN ?? '';

function redact(text) {
    const s = String(text);
    return token ? s.split(token).join('<redacted>') : s;
}

function message(error) {
    let text = error instanceof Error ? error.message : String(error);
    // fetch() says "fetch failed"; the reason (ECONNREFUSED...) is in its cause.
    const cause = error instanceof Error ? error.cause : undefined;
    if (cause) text += `: ${cause instanceof Error ? cause.message : String(cause)}`;
    return redact(text);
}

function usage(text) {
    process.stderr.write(`client.mjs: ${text}\n`);
    process.exit(64);
}

function parseArgs(argv) {
    const options = { url: undefined, timeoutMs: 10000, headers: {}, terminate: false, action: [] };
    let i = 0;
    for (; i < argv.length; i++) {
        const arg = argv[i];
        if (arg === '--timeout-ms') {
            options.timeoutMs = Number(argv[++i]);
            if (!Number.isFinite(options.timeoutMs) || options.timeoutMs <= 0) usage('--timeout-ms: a positive number');
        } else if (arg === '--header') {
            const value = argv[++i] ?? '';
            const colon = value.indexOf(':');
            if (colon <= 0) usage(`--header: "Name: value" expected, got ${JSON.stringify(value)}`);
            options.headers[value.slice(0, colon).trim()] = value.slice(colon + 1).trim();
        } else if (arg === '--terminate') {
            options.terminate = true;
        } else if (options.url === undefined) {
            options.url = arg;
        } else {
            options.action = argv.slice(i);
            break;
        }
    }
    if (options.url === undefined || options.action.length === 0) usage('URL and ACTION expected');
    return options;
}

function emit(object) {
    process.stdout.write(redact(JSON.stringify(object)) + '\n');
}

async function main() {
    const options = parseArgs(process.argv.slice(2));
    const [action, ...rest] = options.action;
    let toolName;
    let toolArgs;
    if (action === 'list') {
        if (rest.length !== 0) usage('list takes no argument');
    } else if (action === 'call') {
        if (rest.length !== 2) usage('call NAME JSONARGS');
        toolName = rest[0];
        try {
            toolArgs = JSON.parse(rest[1]);
        } catch (error) {
            usage(`JSONARGS: ${error.message}`);
        }
    } else {
        usage(`unknown action ${JSON.stringify(action)}`);
    }

    const headers = { ...options.headers };
    if (token) headers.Authorization = `Bearer ${token}`;
    const transport = new StreamableHTTPClientTransport(new URL(options.url), { requestInit: { headers } });
    const client = new Client({ name: 'proxyd-node-test-client', version: '1.0.0' });
    const transportErrors = [];
    client.onerror = error => {
        transportErrors.push(message(error));
    };
    const requestOptions = { timeout: options.timeoutMs, maxTotalTimeout: options.timeoutMs };

    try {
        await client.connect(transport, requestOptions);
    } catch (error) {
        // StreamableHTTPError's code is the HTTP status (-1: an unexpected content type).
        const status = typeof error?.code === 'number' ? ` (code ${error.code})` : '';
        process.stderr.write(`client.mjs: connection failed${status}: ${message(error)}\n`);
        return 2;
    }

    let output;
    try {
        if (action === 'list') {
            const result = await client.listTools(undefined, requestOptions);
            output = { tools: result.tools.map(tool => tool.name) };
        } else {
            const result = await client.callTool({ name: toolName, arguments: toolArgs }, undefined, requestOptions);
            output = { result };
        }
    } catch (error) {
        output = { error: message(error), code: typeof error?.code === 'number' ? error.code : null };
    }
    if (transportErrors.length > 0) output.transport_errors = transportErrors;
    emit(output);

    if (options.terminate) {
        try {
            await transport.terminateSession();
        } catch (error) {
            process.stderr.write(`client.mjs: terminating the session: ${message(error)}\n`);
        }
    }
    await client.close();
    return 0;
}

main().then(
    code => process.exit(code),
    error => {
        process.stderr.write(`client.mjs: ${message(error)}\n`);
        process.exit(2);
    }
);
