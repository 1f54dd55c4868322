#!/usr/bin/env bash
# bench/run.sh: the one command for the defuss benchmark (issues 6 and 14).
#
#   bench/run.sh                      # full run, about 15 minutes, < 20 minutes
#   BENCH_QUICK=1 bench/run.sh        # smoke run
#   BENCH_DURATION=10s BENCH_IDLE_CONNS=5000 bench/run.sh > results.md
#
# It installs wrk and haproxy with apt-get where they are missing, raises
# the open-files limit, builds the bench server and the harness, and runs the
# harness, which prints markdown tables on stdout (progress on stderr):
# throughput with CPU per 10,000 requests, idle memory, the primary's cost as
# the pool grows, and other clients beside a slow-read attack. The attack's
# 1,000 slow readers hold about 2.5 MiB of kernel TCP memory each, more
# than a small machine's net.ipv4.tcp_mem allows (behind defuss, whose
# sockets limit unsent data, about 0.3 MiB): run it on a quiet machine. See
# the doc comment of bench/main.go for every BENCH_* setting. Everything
# binds 127.0.0.1 only. Every process started is stopped on exit, on error
# and on Ctrl-C.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

# Tools. apt-get update only when something must be installed.
missing=()
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)
if ((${#missing[@]})); then
	sudo=()
	[ "$(id -u)" -eq 0 ] || sudo=(sudo)
	echo "bench: installing ${missing[*]}" >&2
	"${sudo[@]}" apt-get update -qq >&2
	DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "${missing[@]}" >&2
fi
command -v go >/dev/null 2>&1 || { echo "bench: go is not installed" >&2; exit 1; }

# Descriptors: an idle proxied connection costs the proxy two sockets (and,
# with Go's splice, two pipes). Raise the hard limit where we may, then the
# soft one to the hard one; the harness and everything it starts inherit it.
ulimit -n 1048576 2>/dev/null || ulimit -n 262144 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

tmp=$(mktemp -d "${TMPDIR:-/tmp}/defuss-bench.XXXXXX")
pidfile="$tmp/pids"
: >"$pidfile"
bench_pid=""

# cleanup stops the harness (which stops what it started, in order), then
# kills anything left that we started: pids the harness recorded whose
# executable is one of ours, and any process running our server binary.
cleanup() {
	local rc=$?
	trap - EXIT INT TERM
	if [ -n "$bench_pid" ] && kill -0 "$bench_pid" 2>/dev/null; then
		# A terminal's Ctrl-C has reached the harness too, and it is
		# stopping in order: give it a moment, then ask (a second signal
		# makes it kill everything at once), then kill it.
		local i
		for i in $(seq 30); do kill -0 "$bench_pid" 2>/dev/null || break; sleep 0.1; done
		kill -TERM "$bench_pid" 2>/dev/null || true
		for i in $(seq 100); do kill -0 "$bench_pid" 2>/dev/null || break; sleep 0.1; done
		kill -KILL "$bench_pid" 2>/dev/null || true
	fi
	local pid exe
	for pid in $(cat "$pidfile" 2>/dev/null) /proc/[0-9]*; do
		pid=${pid#/proc/}
		exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || continue
		case "$exe" in
		"$tmp/benchserver" | "$(command -v haproxy)" | "$(command -v wrk)")
			# A pid from our file, or any process running our own server binary.
			if [ "$exe" = "$tmp/benchserver" ] || grep -qx "$pid" "$pidfile"; then
				echo "bench: killing leftover $exe (pid $pid)" >&2
				kill -KILL "$pid" 2>/dev/null || true
			fi
			;;
		esac
	done
	if [ "${BENCH_KEEP_LOGS:-}" = 1 ] || [ "$rc" -ne 0 ]; then
		echo "bench: logs kept in $tmp" >&2
	else
		rm -rf "$tmp"
	fi
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

echo "bench: building into $tmp" >&2
go build -o "$tmp/benchserver" ./bench/server
go build -o "$tmp/bench" ./bench

start=$(date +%s)
# In the background and waited for, so that a signal runs the trap at once.
BENCH_SERVER="$tmp/benchserver" BENCH_TMP="$tmp" BENCH_PIDFILE="$pidfile" "$tmp/bench" "$@" &
bench_pid=$!
set +e
wait "$bench_pid"
rc=$?
set -e
bench_pid=""
echo "bench: total $(($(date +%s) - start))s" >&2
exit "$rc"
