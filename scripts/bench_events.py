#!/usr/bin/env python3
"""Live events at scale (issue 33, P6), driven by scripts/bench-events.sh.

Makes ACCOUNTS accounts (each with a vault), opens STREAMS_PER_ACCOUNT
`GET /sync/events` streams on each account's vault, waits for every
stream's first event, prints `streams: N open` and reads a line from stdin
(the script measures keepd's memory before the streams, at the line
`streams: N accounts made`, and once they are open), then pushes PUSHES one-entry
batches into the first account's vault one after another, timing each
from the request sent to the event on every stream of that vault. Every
other stream must stay quiet. Standard library only.

    bench_events.py PORT ACCOUNTS STREAMS_PER_ACCOUNT PUSHES
"""

import asyncio
import base64
import json
import statistics
import sys
import time

HOST = "127.0.0.1"
PASSWORD = "benchmark password"


async def request(port, method, path, body=None, token=None):
    """One HTTP/1.1 request on its own connection: (status, JSON body)."""
    reader, writer = await asyncio.open_connection(HOST, port)
    data = json.dumps(body).encode() if body is not None else b""
    head = [f"{method} {path} HTTP/1.1", f"Host: {HOST}", "Connection: close",
            "Content-Type: application/json", f"Content-Length: {len(data)}"]
    if token:
        head.append(f"Authorization: Bearer {token}")
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + data)
    await writer.drain()
    raw = await reader.read()
    writer.close()
    status = int(raw.split(b" ", 2)[1])
    payload = raw.split(b"\r\n\r\n", 1)[1]
    if b"transfer-encoding: chunked" in raw.split(b"\r\n\r\n", 1)[0].lower():
        payload = dechunk(payload)
    if status >= 300:
        sys.exit(f"bench-events: {method} {path}: {status} {payload[:300]!r}")
    return status, json.loads(payload) if payload else None


def dechunk(data):
    out = b""
    while data:
        size, rest = data.split(b"\r\n", 1)
        n = int(size, 16)
        if n == 0:
            break
        out += rest[:n]
        data = rest[n + 2:]
    return out


async def account(port, n, sem):
    async with sem:
        email = f"events-{n}-{time.time_ns()}@example.org"
        await request(port, "POST", "/auth/register", {"email": email, "password": PASSWORD})
        _, answer = await request(port, "POST", "/auth/login", {"email": email, "password": PASSWORD})
        token = answer["token"]
        await request(port, "POST", "/sync/vault-key", {
            "vaultId": "watched", "encryptedVaultKey": "a2V5", "salt": "c2FsdA==",
            "nonce": "bm9uY2U="}, token)
        return token


class Stream:
    """One open event stream; `events` gets each `sync` event's sequence."""

    def __init__(self):
        self.first = asyncio.get_running_loop().create_future()
        self.events = asyncio.Queue()
        self.ended = None

    async def run(self, port, token, sem, source):
        async with sem:
            reader, writer = await asyncio.open_connection(HOST, port, local_addr=(source, 0))
            writer.write((f"GET /sync/events?vaultId=watched HTTP/1.1\r\nHost: {HOST}\r\n"
                          f"Authorization: Bearer {token}\r\nAccept: text/event-stream\r\n\r\n").encode())
            await writer.drain()
            status = (await reader.readline()).split(b" ", 2)[1]
            if status != b"200":
                self.first.set_exception(RuntimeError(f"stream refused: {status!r}"))
                return
        self.writer = writer
        event = None
        while True:
            line = await reader.readline()
            if not line:
                self.ended = self.ended or "closed"
                if not self.first.done():
                    self.first.set_exception(RuntimeError("stream closed"))
                return
            line = line.strip()
            if line.startswith(b"event: "):
                event = line[7:].decode()
            elif line.startswith(b"id: ") and event == "sync":
                sequence = int(line[4:])
                if not self.first.done():
                    self.first.set_result(sequence)
                else:
                    self.events.put_nowait((time.perf_counter(), sequence))
            elif line.startswith(b"data: ") and event == "end":
                self.ended = line[6:].decode()


async def main():
    port, accounts, per_account, pushes = (int(a) for a in sys.argv[1:5])
    sem = asyncio.Semaphore(8)
    tokens = await asyncio.gather(*(account(port, n, sem) for n in range(accounts)))
    print(f"streams: {accounts} accounts made", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    # A head to announce: every stream's first event is the vault's head.
    entry = {"encryptedData": base64.b64encode(b"x" * 64).decode(), "nonce": "bm9uY2Vub25jZQ==",
             "haexTimestamp": "0"}
    opening = asyncio.Semaphore(64)
    async def first_push(token):
        async with sem:
            await request(port, "POST", "/sync/push", {"vaultId": "watched", "logs": [entry]}, token)
    await asyncio.gather(*(first_push(t) for t in tokens))
    streams = [[Stream() for _ in range(per_account)] for _ in tokens]
    # 200 client addresses, 50 streams each: within the per-client caps.
    tasks = [asyncio.create_task(s.run(port, t, opening, f"127.0.0.{2 + i % 200}"))
             for i, (t, s) in enumerate((t, s) for t, mine in zip(tokens, streams) for s in mine)]
    await asyncio.gather(*(s.first for mine in streams for s in mine))
    total = accounts * per_account
    print(f"streams: {total} open", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)

    watched, others = streams[0], [s for mine in streams[1:] for s in mine]
    latencies = []
    for n in range(pushes):
        sent = time.perf_counter()
        _, answer = await request(port, "POST", "/sync/push", {
            "vaultId": "watched", "logs": [dict(entry, haexTimestamp=str(n + 1))]}, tokens[0])
        sequence = answer["logs"][0]["sequence"]
        for s in watched:
            while True:
                at, got = await asyncio.wait_for(s.events.get(), 5)
                if got >= sequence:
                    latencies.append(1000 * (at - sent))
                    break
    quiet = sum(s.events.qsize() for s in others)
    ended = sum(1 for mine in streams for s in mine if s.ended)
    latencies.sort()
    p = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]
    print(f"events: {len(latencies)} push->event over {len(watched)} streams of the pushed vault: "
          f"p50 {p(0.5):.2f} ms p99 {p(0.99):.2f} ms max {latencies[-1]:.2f} ms "
          f"mean {statistics.mean(latencies):.2f} ms", flush=True)
    print(f"events: other streams got {quiet} events (0 expected); {ended} streams ended", flush=True)
    for t in tasks:
        t.cancel()
    if quiet or ended:
        sys.exit(1)


asyncio.run(main())
