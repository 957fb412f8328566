// An MCP upstream written the way the TypeScript SDK (v1.x) documents a Streamable HTTP server
// with express: `app.use(express.json())` with its DEFAULT options (body-parser honours the
// Content-Type charset: utf-7, utf-16... are decoded by iconv-lite), then
// `transport.handleRequest(req, res, req.body)`. Used by tests/kit/nodekit.py.
//
//   node upstream.mjs [--stateless|--stateful] [--json|--sse] [--port N] [--exit-on-eof]
//
//   --stateless   sessionIdGenerator: undefined, a new McpServer + transport per POST
//                 (GET/DELETE answer 405), as the SDK's stateless example
//   --stateful    (default) session ids (randomUUID), one transport per session, kept in a map
//   --json        enableJsonResponse: true (answers are application/json)
//   --sse         (default) answers are text/event-stream
//   --port N      listen on 127.0.0.1:N (default 0: a free port)
//   --exit-on-eof exit when stdin reaches end of file (the parent died or closed the pipe)
//
// Prints exactly one line `LISTENING <port>` on stdout once the socket accepts connections.
//
// Recording, at GET /_calls (a JSON list, oldest first; DELETE /_calls empties it):
//   {"kind": "body", "http_method", "path", "content_type", "content_encoding", "session_id",
//    "body"}            every request body on /mcp as express.json() parsed it (req.body;
//                       null when express.json() left it unparsed)
//   {"kind": "body_error", "http_method", "path", "content_type", "status", "type", "error"}
//                       a body express.json() refused (415 charset, 400 parse error...)
//   {"kind": "rpc", "session_id", "message"}
//                       every JSON-RPC message the SDK transport handed to the McpServer
//   {"kind": "tool", "name", "arguments", "session_id"}
//                       every tool the server EXECUTED, with the arguments its handler got
import { randomUUID } from 'node:crypto';
import process from 'node:process';

import express from 'express';
import { z } from 'zod';
import { McpServer } from '@modelcontextprotocol/sdk/server/mcp.js';
import { StreamableHTTPServerTransport } from '@modelcontextprotocol/sdk/server/streamableHttp.js';
import { isInitializeRequest } from '@modelcontextprotocol/sdk/types.js';

function parseArgs(argv) {
    const options = { stateless: false, jsonResponse: false, port: 0, exitOnEof: false };
    for (let i = 0; i < argv.length; i++) {
        const arg = argv[i];
        if (arg === '--stateless') options.stateless = true;
        else if (arg === '--stateful') options.stateless = false;
        else if (arg === '--json') options.jsonResponse = true;
        else if (arg === '--sse') options.jsonResponse = false;
        else if (arg === '--exit-on-eof') options.exitOnEof = true;
        else if (arg === '--port') {
            const port = Number(argv[++i]);
            if (!Number.isInteger(port) || port < 0 || port > 65535) {
                throw new Error(`--port: not a port: ${argv[i]}`);
            }
            options.port = port;
        } else throw new Error(`unknown argument: ${arg}`);
    }
    return options;
}

const options = parseArgs(process.argv.slice(2));
const calls = [];

function header(req, name) {
    const value = req.headers[name];
    return value === undefined ? null : value;
}

function textResult(text) {
    return { content: [{ type: 'text', text }] };
}

function makeServer(sessionId) {
    const server = new McpServer({ name: 'proxyd-node-upstream', version: '1.0.0' });
    // Loose objects: the handler gets every argument the client sent, and so does the record.
    const tool = (name, description, shape, run) => {
        server.registerTool(name, { description, inputSchema: z.looseObject(shape) }, async args => {
            calls.push({ kind: 'tool', name, arguments: args, session_id: sessionId() });
            return run(args);
        });
    };
    tool('echo', 'Returns its text', { text: z.string() }, args => textResult(args.text));
    tool('get_time', 'The current time (ISO 8601)', {}, () => textResult(new Date().toISOString()));
    tool('get_secret', 'A secret', {}, () => textResult('the-secret-value'));
    tool('delete_everything', 'Deletes everything (a denied tool)', {}, () => textResult('deleted everything'));
    tool('search_docs', 'Searches the docs', { query: z.string().optional() }, args =>
        textResult(`results for ${args.query ?? ''}`)
    );
    return server;
}

// Wraps the transport's onmessage (set by server.connect) to record what the server was handed.
function recordMessages(transport) {
    const deliver = transport.onmessage;
    transport.onmessage = (message, extra) => {
        calls.push({ kind: 'rpc', session_id: transport.sessionId ?? null, message });
        deliver?.(message, extra);
    };
}

const app = express();

app.get('/_calls', (req, res) => {
    res.json(calls);
});
app.delete('/_calls', (req, res) => {
    calls.length = 0;
    res.status(204).end();
});

// The SDK README's setup: express.json() with its default options.
app.use(express.json());

app.use('/mcp', (req, res, next) => {
    calls.push({
        kind: 'body',
        http_method: req.method,
        path: req.originalUrl,
        content_type: header(req, 'content-type'),
        content_encoding: header(req, 'content-encoding'),
        session_id: header(req, 'mcp-session-id'),
        body: req.body === undefined ? null : req.body
    });
    next();
});

function jsonRpcError(res, status, message) {
    res.status(status).json({ jsonrpc: '2.0', error: { code: -32000, message }, id: null });
}

if (options.stateless) {
    app.post('/mcp', async (req, res) => {
        const server = makeServer(() => null);
        const transport = new StreamableHTTPServerTransport({
            sessionIdGenerator: undefined,
            enableJsonResponse: options.jsonResponse
        });
        res.on('close', () => {
            transport.close();
            server.close();
        });
        try {
            await server.connect(transport);
            recordMessages(transport);
            await transport.handleRequest(req, res, req.body);
        } catch (error) {
            console.error('upstream: error handling request:', error);
            if (!res.headersSent) jsonRpcError(res, 500, 'Internal server error');
        }
    });
    app.get('/mcp', (req, res) => jsonRpcError(res, 405, 'Method not allowed.'));
    app.delete('/mcp', (req, res) => jsonRpcError(res, 405, 'Method not allowed.'));
} else {
    const transports = new Map();
    app.post('/mcp', async (req, res) => {
        try {
            const sessionId = req.headers['mcp-session-id'];
            let transport;
            if (sessionId && transports.has(sessionId)) {
                transport = transports.get(sessionId);
            } else if (!sessionId && isInitializeRequest(req.body)) {
                transport = new StreamableHTTPServerTransport({
                    sessionIdGenerator: () => randomUUID(),
                    enableJsonResponse: options.jsonResponse,
                    onsessioninitialized: id => {
                        transports.set(id, transport);
                    }
                });
                transport.onclose = () => {
                    if (transport.sessionId) transports.delete(transport.sessionId);
                };
                const server = makeServer(() => transport.sessionId ?? null);
                await server.connect(transport);
                recordMessages(transport);
            } else {
                jsonRpcError(res, 400, 'Bad Request: No valid session ID provided');
                return;
            }
            await transport.handleRequest(req, res, req.body);
        } catch (error) {
            console.error('upstream: error handling request:', error);
            if (!res.headersSent) jsonRpcError(res, 500, 'Internal server error');
        }
    });
    const sessionRequest = async (req, res) => {
        const sessionId = req.headers['mcp-session-id'];
        if (!sessionId || !transports.has(sessionId)) {
            res.status(400).send('Invalid or missing session ID');
            return;
        }
        await transports.get(sessionId).handleRequest(req, res);
    };
    app.get('/mcp', sessionRequest);
    app.delete('/mcp', sessionRequest);
}

// Records what express.json() refused, then lets express answer as it always does.
app.use((err, req, res, next) => {
    calls.push({
        kind: 'body_error',
        http_method: req.method,
        path: req.originalUrl,
        content_type: header(req, 'content-type'),
        status: err.status ?? err.statusCode ?? 500,
        type: err.type ?? null,
        error: String(err.message)
    });
    next(err);
});

// Express 5 calls this back with the error when listening fails.
const httpServer = app.listen(options.port, '127.0.0.1', error => {
    if (error) {
        console.error(`upstream: ${error.message}`);
        process.exit(1);
    }
    process.stdout.write(`LISTENING ${httpServer.address().port}\n`);
});

function shutdown() {
    httpServer.close();
    httpServer.closeAllConnections();
    process.exit(0);
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);
if (options.exitOnEof) {
    process.stdin.on('end', shutdown);
    process.stdin.on('error', shutdown);
    process.stdin.resume();
}
