// An independent reader: what Node (express.json()/body-parser, undici's fetch Response, the
// TypeScript MCP SDK's client transport) reads from given bytes. Long-running; driven by the
// JsonReader of tests/kit/nodekit.py.
//
// Protocol: prints `READY` once, then reads newline-delimited JSON requests on stdin and answers
// each with exactly one JSON line on stdout, in order. A request that cannot be understood gets
// {"ok": false, "error": "...", "bad_request": true}.
//
// Bytes come as "body_b64" (base64), or for the stream modes as "chunks_b64" (a list: each chunk
// is delivered separately, as the network would split them).
//
// mode "request": the body of a POST to an express app with `app.use(express.json())`.
//   The REAL express.json() middleware (default options) runs on the bytes, with the headers
//   `Content-Type: <content_type>` (default "application/json"; null = no header),
//   `Content-Encoding: <content_encoding>` (default none) and `Content-Length`. What body-parser
//   2.x does, read from its source (lib/read.js, lib/types/json.js, raw-body, iconv-lite):
//     * parses only when type-is matches application/json (media type compared lowercased,
//       parameters ignored); otherwise req.body stays undefined: {"ok": false, "skipped": true}
//     * charset = the FIRST `charset` parameter (lowercased) as the lenient content-type 2.x
//       parser reads it, default utf-8; it must start with "utf-" (else 415) and be known to
//       iconv-lite (utf-7, utf-7-imap, utf-16, utf-16le/be, utf-32, utf-32le/be...; else 415).
//       NO charset is refused otherwise: utf-7 bodies are decoded as UTF-7.
//     * Content-Encoding: identity (or none), gzip, deflate, br (zstd on Node >= 22.15): the body
//       is decompressed first; anything else (including lists like "gzip, br") -> 415
//     * decoding: iconv-lite's decoder for the charset, which for BOM-aware codecs (utf-8,
//       utf-16, ucs2...) STRIPS ONE leading U+FEFF; invalid UTF-8 becomes U+FFFD (never an
//       error). So for utf-8: JSON.parse(buffer.toString('utf8') minus one leading U+FEFF).
//     * strict mode: an empty body parses as {} (!), otherwise the first non-whitespace char
//       must be '{' or '['; then JSON.parse (duplicate keys: the LAST wins)
//     * limit 100kb -> 413
//   -> {"ok": true, "method", "name", "id", "has_id", "arguments", "batch", "messages":
//       [{"method", "name", "id", "has_id"}...], "sdk_ok"}
//      (method/name/id/arguments from the single message; all null for a batch). "sdk_ok": the
//      SDK server's JSONRPCMessageSchema accepts every message (else it answers 400 -32700).
//   or {"ok": false, "status": 4xx, "type": "entity.parse.failed"|"charset.unsupported"|...,
//       "error": "..."}
//
// mode "answer": a JSON answer body as the SDK client reads it: `await response.json()` (undici:
//   UTF-8 decode, which strips one leading BOM and never fails on invalid bytes, then JSON.parse),
//   then JSONRPCMessageSchema.parse of the object or of each element of an array. The charset of
//   the answer's Content-Type is never looked at.
//   -> {"ok": true, "messages": n, "tools": [names]|null, "ids": [...], "sdk_ok": bool,
//       "sdk_tools": [names]|null, "items": [{"id", "tools", "sdk_tools"}...]}
//      "tools": names under result.tools of every message (null when no message has them);
//      "sdk_tools": the same for messages the SDK accepts whose result passes
//      ListToolsResultSchema (what Client.listTools() would return), null when none.
//   or {"ok": false, "error": "..."} when response.json() throws.
//
// mode "sse": a text/event-stream body read EXACTLY as StreamableHTTPClientTransport does:
//   bytes -> TextDecoderStream (UTF-8, strips one leading BOM, invalid bytes -> U+FFFD)
//         -> eventsource-parser's EventSourceParserStream (the SDK's own dependency).
//   -> {"ok": true, "events": [{"event", "id", "jsonrpc_id", "tools", "sdk_reads",
//       "sdk_tools"}...], "unparsed": n, "sdk_tools": [names]|null, "dispatched": n}
//      "events": every dispatched event whose data JSON.parses; "event" is the event type (null
//      when none: the SDK takes null and "message" as messages and ignores every other type);
//      "id" the SSE id field; "sdk_reads": the SDK hands it to the client (non-empty data, type
//      null or "message", JSONRPCMessageSchema accepts it); "unparsed": dispatched events with
//      non-empty data that JSON.parse refuses; "sdk_tools": union over events the SDK reads.
//
// mode "http_answer": a whole answer to a POST that carried a request, as
//   StreamableHTTPClientTransport.send() decides on it: "status" (default 200), "content_type"
//   (the header's value; null = absent; several headers joined with ", " as fetch does).
//   -> {"ok": true, "outcome": "http_error"|"accepted"|"json"|"sse"|"unexpected_content_type",
//       "media_type": essence|null, ...the "answer" or "sse" fields for json/sse}
//      not 2xx: the body is only read as error text (outcome "http_error"); 202: ignored;
//      otherwise the SDK's mediaTypeEssence() decides.
import { existsSync } from 'node:fs';
import { createInterface } from 'node:readline';
import { Readable } from 'node:stream';
import process from 'node:process';

import express from 'express';
import { mediaTypeEssence } from '@modelcontextprotocol/sdk/shared/mediaType.js';
import { JSONRPCMessageSchema, ListToolsResultSchema } from '@modelcontextprotocol/sdk/types.js';

// The eventsource-parser the SDK itself imports: Node resolves 'eventsource-parser/stream' from
// the SDK's file by looking in the SDK's own node_modules first, then up the tree.
const nested = new URL(
    './node_modules/@modelcontextprotocol/sdk/node_modules/eventsource-parser/dist/stream.js',
    import.meta.url
);
const { EventSourceParserStream } = existsSync(nested)
    ? await import(nested.href)
    : await import('eventsource-parser/stream');

const jsonParser = express.json();

const own = (object, key) =>
    object !== null && typeof object === 'object' && !Array.isArray(object) && Object.hasOwn(object, key)
        ? object[key]
        : undefined;
const orNull = value => (value === undefined ? null : value);

function toolNames(message) {
    const tools = own(own(message, 'result'), 'tools');
    if (!Array.isArray(tools)) return null;
    return tools.map(tool => orNull(own(tool, 'name')));
}

function sdkMessage(value) {
    const parsed = JSONRPCMessageSchema.safeParse(value);
    return parsed.success ? parsed.data : undefined;
}

function sdkToolNames(message) {
    if (message === undefined || !Object.hasOwn(message, 'result')) return null;
    const parsed = ListToolsResultSchema.safeParse(message.result);
    return parsed.success ? parsed.data.tools.map(tool => tool.name) : null;
}

function union(lists) {
    const present = lists.filter(list => list !== null);
    return present.length === 0 ? null : present.flat();
}

function bytesOf(request) {
    if (Array.isArray(request.chunks_b64)) return request.chunks_b64.map(chunk => Buffer.from(chunk, 'base64'));
    if (typeof request.body_b64 === 'string') return [Buffer.from(request.body_b64, 'base64')];
    throw new TypeError('body_b64 (a string) or chunks_b64 (a list) expected');
}

function streamOf(chunks) {
    return new ReadableStream({
        start(controller) {
            for (const chunk of chunks) controller.enqueue(new Uint8Array(chunk));
            controller.close();
        }
    });
}

function describe(message) {
    const params = own(message, 'params');
    return {
        method: orNull(own(message, 'method')),
        name: orNull(own(params, 'name')),
        id: orNull(own(message, 'id')),
        has_id: message !== null && typeof message === 'object' && Object.hasOwn(message, 'id')
    };
}

async function readRequest(request) {
    const chunks = bytesOf(request);
    const size = chunks.reduce((total, chunk) => total + chunk.length, 0);
    const headers = { 'content-length': String(size) };
    const contentType = request.content_type === undefined ? 'application/json' : request.content_type;
    if (contentType !== null) headers['content-type'] = contentType;
    if (request.content_encoding != null) headers['content-encoding'] = request.content_encoding;
    // A stand-in for the IncomingMessage: body-parser reads the headers and the stream. A plain
    // Readable (not a Duplex: on-finished would take a Duplex's writableEnded for "already read").
    const req = Readable.from(chunks, { objectMode: false });
    req.headers = headers;
    req.method = 'POST';
    req.url = '/mcp';
    const error = await new Promise(resolve => jsonParser(req, {}, resolve));
    if (error) {
        return {
            ok: false,
            status: error.status ?? error.statusCode ?? 500,
            type: error.type ?? null,
            error: String(error.message)
        };
    }
    if (req.body === undefined) {
        return { ok: false, skipped: true, error: 'express.json() did not parse the body (type-is: not application/json)' };
    }
    const body = req.body;
    const batch = Array.isArray(body);
    const messages = batch ? body : [body];
    const single = batch ? { method: null, name: null, id: null, has_id: false } : describe(body);
    return {
        ok: true,
        ...single,
        arguments: batch ? null : orNull(own(own(body, 'params'), 'arguments')),
        batch,
        messages: messages.map(describe),
        sdk_ok: messages.every(message => sdkMessage(message) !== undefined)
    };
}

async function readAnswerChunks(chunks) {
    let data;
    try {
        data = await new Response(streamOf(chunks)).json();
    } catch (error) {
        return { ok: false, error: String(error.message) };
    }
    const messages = Array.isArray(data) ? data : [data];
    const parsed = messages.map(sdkMessage);
    const items = messages.map((message, i) => ({
        id: orNull(own(message, 'id')),
        tools: toolNames(message),
        sdk_tools: sdkToolNames(parsed[i])
    }));
    return {
        ok: true,
        messages: messages.length,
        tools: union(items.map(item => item.tools)),
        ids: items.map(item => item.id),
        sdk_ok: parsed.every(message => message !== undefined),
        sdk_tools: union(items.map(item => item.sdk_tools)),
        items
    };
}

async function readSseChunks(chunks) {
    const reader = streamOf(chunks)
        .pipeThrough(new TextDecoderStream())
        .pipeThrough(new EventSourceParserStream({ onRetry: () => {} }))
        .getReader();
    const events = [];
    let unparsed = 0;
    let dispatched = 0;
    for (;;) {
        const { value: event, done } = await reader.read();
        if (done) break;
        dispatched++;
        if (!event.data) continue; // the SDK skips events without data
        let message;
        try {
            message = JSON.parse(event.data);
        } catch {
            unparsed++;
            continue;
        }
        const isMessageType = !event.event || event.event === 'message';
        const sdk = isMessageType ? sdkMessage(message) : undefined;
        events.push({
            event: orNull(event.event),
            id: orNull(event.id),
            jsonrpc_id: orNull(own(message, 'id')),
            tools: toolNames(message),
            sdk_reads: sdk !== undefined,
            sdk_tools: sdkToolNames(sdk)
        });
    }
    return {
        ok: true,
        events,
        unparsed,
        dispatched,
        sdk_tools: union(events.map(event => event.sdk_tools))
    };
}

async function readHttpAnswer(request) {
    const status = request.status ?? 200;
    const contentType = request.content_type ?? null;
    const chunks = bytesOf(request);
    if (!(status >= 200 && status <= 299)) return { ok: true, outcome: 'http_error', media_type: null };
    if (status === 202) return { ok: true, outcome: 'accepted', media_type: null };
    const mediaType = orNull(mediaTypeEssence(contentType));
    if (mediaType === 'text/event-stream') {
        return { ...(await readSseChunks(chunks)), outcome: 'sse', media_type: mediaType };
    }
    if (mediaType === 'application/json') {
        return { ...(await readAnswerChunks(chunks)), outcome: 'json', media_type: mediaType };
    }
    return { ok: true, outcome: 'unexpected_content_type', media_type: mediaType };
}

async function handle(line) {
    let request;
    try {
        request = JSON.parse(line);
        if (request === null || typeof request !== 'object') throw new TypeError('a JSON object expected');
        switch (request.mode) {
            case 'request':
                return await readRequest(request);
            case 'answer':
                return await readAnswerChunks(bytesOf(request));
            case 'sse':
                return await readSseChunks(bytesOf(request));
            case 'http_answer':
                return await readHttpAnswer(request);
            default:
                throw new TypeError(`unknown mode ${JSON.stringify(request.mode)}`);
        }
    } catch (error) {
        return { ok: false, error: String(error?.message ?? error), bad_request: true };
    }
}

const lines = createInterface({ input: process.stdin, crlfDelay: Infinity });
process.stdout.write('READY\n');
for await (const line of lines) {
    if (line.trim() === '') continue;
    process.stdout.write(JSON.stringify(await handle(line)) + '\n');
}
