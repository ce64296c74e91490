#!/usr/bin/env bash
# See p2ptun work, on this machine only (everything listens on 127.0.0.1):
#
#   1. builds the release binaries,
#   2. starts S (p2ptun-relay) with a temporary state dir,
#   3. starts a tiny echo service (python3: the one thing here beyond bash and coreutils),
#   4. `p2ptun expose` publishes it as "demo", `p2ptun forward demo PORT` makes it local again,
#   5. pushes DEMO_MIB (default 256) MiB of random bytes through the tunnel and back, and
#      prints the SHA-256 on both sides, the throughput and the path the agents chose.
#
# Usage: scripts/demo.sh            (DEMO_MIB=64 scripts/demo.sh for a quicker run;
#                                    DEMO_KEEP=1 keeps the logs and state dir)
# Needs: cargo, python3. Takes a few minutes the first time (the build), seconds after.
set -euo pipefail

cd "$(dirname "$0")/.."
MIB="${DEMO_MIB:-256}"
case "$MIB" in '' | *[!0-9]*) echo "DEMO_MIB must be a number of MiB" >&2; exit 2 ;; esac
command -v python3 >/dev/null || { echo "demo.sh needs python3 (for the echo service)" >&2; exit 1; }

if [ -t 1 ]; then say() { printf "\033[1m==> %s\033[0m\n" "$*"; }; else say() { printf "==> %s\n" "$*"; }; fi

say "building release binaries: cargo build --release --workspace"
cargo build --release --workspace
BIN="$PWD/target/release"
export NO_COLOR=1 # plain log lines, for grep

WORK="$(mktemp -d "${TMPDIR:-/tmp}/p2ptun-demo.XXXXXX")"
PIDS=()
cleanup() {
    local status=$?
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    if [ "$status" != 0 ]; then
        echo
        echo "demo FAILED (exit $status). Last lines of each log:" >&2
        for log in "$WORK"/*.log; do
            [ -f "$log" ] || continue
            echo "--- $log" >&2
            tail -n 15 "$log" >&2
        done
    fi
    if [ "${DEMO_KEEP:-}" = 1 ] || [ "$status" != 0 ]; then
        echo "logs and state kept in $WORK"
    else
        rm -rf "$WORK"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The helper: free ports, the echo service, the readiness probe and the transfer.
cat >"$WORK/tool.py" <<'PY'
import hashlib, os, socket, sys, threading, time

def free_port(udp_and_tcp=False):
    for _ in range(100):
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.bind(("127.0.0.1", 0))
        port = u.getsockname()[1]
        if not udp_and_tcp:
            u.close()
            return port
        t = socket.socket()
        try:
            t.bind(("127.0.0.1", port))
            return port
        except OSError:
            continue
        finally:
            t.close()
            u.close()
    sys.exit("no free port")

def serve(port):
    # Echo each connection back, hashing what passes; report the big ones.
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(64)
    def handle(c):
        h, n = hashlib.sha256(), 0
        try:
            while True:
                b = c.recv(1 << 16)
                if not b:
                    break
                h.update(b)
                n += len(b)
                c.sendall(b)
            c.shutdown(socket.SHUT_WR)
        except OSError as e:
            print(f"service: connection failed after {n} bytes: {e}", flush=True)
        finally:
            c.close()
        if n >= 1 << 20:
            print(f"service: received and echoed {n} bytes, sha256 {h.hexdigest()}", flush=True)
    while True:
        c, _ = srv.accept()
        threading.Thread(target=handle, args=(c,), daemon=True).start()

def probe(port, seconds):
    # Retry one small echo round trip until it works (the exposer registers asynchronously).
    deadline = time.time() + seconds
    last = None
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
                s.settimeout(3)
                s.sendall(b"ping")
                got = b""
                while len(got) < 4:
                    b = s.recv(4 - len(got))
                    if not b:
                        break
                    got += b
                if got == b"ping":
                    return
                last = f"got {got!r}"
        except OSError as e:
            last = str(e)
        time.sleep(0.25)
    sys.exit(f"the tunnel did not answer within {seconds} s (last: {last})")

def push(port, mib):
    # Send MIB MiB of random bytes while reading the echo; compare digests.
    total = mib << 20
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.settimeout(120)
    sent_h, recv_h = hashlib.sha256(), hashlib.sha256()
    err = []
    def writer():
        try:
            left = total
            while left:
                chunk = os.urandom(min(left, 1 << 20))
                sent_h.update(chunk)
                s.sendall(chunk)
                left -= len(chunk)
            s.shutdown(socket.SHUT_WR)
        except OSError as e:
            err.append(e)
    start = time.time()
    w = threading.Thread(target=writer)
    w.start()
    got = 0
    while True:
        b = s.recv(1 << 16)
        if not b:
            break
        recv_h.update(b)
        got += len(b)
    w.join()
    secs = time.time() - start
    s.close()
    if err:
        sys.exit(f"sending failed: {err[0]}")
    print(f"sent     {total} bytes, sha256 {sent_h.hexdigest()}")
    print(f"received {got} bytes, sha256 {recv_h.hexdigest()}")
    print(f"{mib} MiB out and {mib} MiB back at once in {secs:.2f} s: "
          f"{mib / secs:.1f} MiB/s each way")
    if got != total or sent_h.digest() != recv_h.digest():
        sys.exit("MISMATCH: the bytes that came back differ from the bytes sent")
    print("OK: identical")

cmd = sys.argv[1]
if cmd == "port":
    print(free_port(udp_and_tcp=len(sys.argv) > 2))
elif cmd == "serve":
    serve(int(sys.argv[2]))
elif cmd == "probe":
    probe(int(sys.argv[2]), float(sys.argv[3]))
elif cmd == "push":
    push(int(sys.argv[2]), int(sys.argv[3]))
PY
tool() { python3 "$WORK/tool.py" "$@"; }

S_PORT="$(tool port udp+tcp)"
ALT_PORT="$(tool port)"
SVC_PORT="$(tool port)"
FWD_PORT="$(tool port)"

say "starting S: p2ptun-relay --listen 127.0.0.1:$S_PORT --stun-alt 127.0.0.1:$ALT_PORT --state-dir $WORK/relay-state"
"$BIN/p2ptun-relay" --listen "127.0.0.1:$S_PORT" --stun-alt "127.0.0.1:$ALT_PORT" \
    --state-dir "$WORK/relay-state" >"$WORK/relay.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do
    grep -q listening "$WORK/relay.log" 2>/dev/null && break
    kill -0 "${PIDS[0]}" 2>/dev/null || { echo "S exited" >&2; exit 1; }
    sleep 0.2
done
grep -q listening "$WORK/relay.log" || { echo "S did not start within 20 s" >&2; exit 1; }

say "starting the echo service on 127.0.0.1:$SVC_PORT (python3)"
python3 -u "$WORK/tool.py" serve "$SVC_PORT" >"$WORK/service.log" 2>&1 &
PIDS+=($!)

# Each agent has its own state dir (identity key, pinned keys). --bind keeps the agents'
# UDP socket on loopback, so the demo sends nothing beyond this machine's 127.0.0.1.
AGENT=("$BIN/p2ptun" --server "127.0.0.1:$S_PORT" --bind 127.0.0.1:0)
say "exposing it: p2ptun --server 127.0.0.1:$S_PORT expose $SVC_PORT --name demo"
"${AGENT[@]}" --state-dir "$WORK/home-state" expose "$SVC_PORT" --name demo \
    >"$WORK/expose.log" 2>&1 &
PIDS+=($!)
say "forwarding it: p2ptun --server 127.0.0.1:$S_PORT forward demo $FWD_PORT"
"${AGENT[@]}" --state-dir "$WORK/laptop-state" forward demo "$FWD_PORT" \
    >"$WORK/forward.log" 2>&1 &
PIDS+=($!)

say "waiting for the tunnel on 127.0.0.1:$FWD_PORT"
tool probe "$FWD_PORT" 30

say "pushing $MIB MiB through 127.0.0.1:$FWD_PORT -> tunnel -> echo service -> tunnel -> back"
timeout 600 python3 "$WORK/tool.py" push "$FWD_PORT" "$MIB"
sleep 0.5
grep "service:" "$WORK/service.log" | tail -n 1 || true

# The agents may connect through S first and move to a direct path as soon as a hole punch
# succeeds; show every such line of the forwarder's log, without the timestamps.
say "the paths the forwarder used (from its log)"
if ! grep -hE "connected to peer|found direct|via (direct|relay)" "$WORK/forward.log" |
    sed -E 's/^[^ ]+ +//' | tail -n 5; then
    echo "(no path line in $WORK/forward.log)"
fi
echo
say "done; stopping S, the agents and the service"
