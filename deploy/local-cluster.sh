#!/usr/bin/env bash
# deploy/local-cluster.sh N: N `gpt2 serve` replicas on loopback, each pinned
# to its own cores, behind HAProxy (deploy/haproxy.cfg). Runs in the
# foreground until Ctrl-C or SIGTERM, then stops everything it started.
#
# Usage: deploy/local-cluster.sh N [options] [-- extra `gpt2 serve` flags]
#   --weights DIR          checkpoint directory (default: the synthetic 124M one, --synthetic)
#   --cores-per-replica K  cores (and engine threads) per replica (default 1)
#   --port P               HAProxy's port (default 8080)
#   --replica-ports LIST   the replicas' ports, comma-separated (default P+1 ... P+N)
#   --stats-port P         HAProxy's stats page, /stats (default 8404)
#   --state-dir DIR        logs, pid files, the generated config (default: a new temporary directory)
#   --drain-seconds S      each replica's --drain-seconds (default 2: HAProxy checks every 1 s)
#   --grace-seconds S      each replica's --grace-seconds (default 30)
#   --no-restart           a replica that exits stays down (default: restarted after 1 s)
# Environment: GPT2_BIN, the gpt2 binary (default: target/release/gpt2 next to this script).
#
# Replica i runs on cores i*K .. i*K+K-1 (taskset) with --threads K; N*K
# must not pass the cores this script may use, so replicas never share a
# core. A replica that exits (SIGTERM after its drain, a crash, SIGKILL) is
# restarted on the same port and cores, as a process supervisor or
# Kubernetes would; its pid is always in STATE_DIR/replica-I.pid. The script
# prints `local-cluster: ready: http://127.0.0.1:P` once HAProxy sees every
# replica up, and exits non-zero if that never happens.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
die() { echo "local-cluster: $*" >&2; exit 2; }
say() { echo "local-cluster: $*" >&2; }

[[ $# -ge 1 && $1 =~ ^[0-9]+$ && $1 -ge 1 ]] || die "usage: $0 N [options] [-- serve flags]: N, the number of replicas, must be a whole number >= 1 (got '${1:-}')"
replicas=$1
shift
weights=() cores_per=1 lb_port=8080 ports_csv="" stats_port=8404 state="" drain=2 grace=30 restart=1
serve_extra=()
while [[ $# -gt 0 ]]; do
    case $1 in
        --weights) weights=(--weights "${2:?--weights needs a directory}"); shift 2 ;;
        --cores-per-replica) cores_per=${2:?}; shift 2 ;;
        --port) lb_port=${2:?}; shift 2 ;;
        --replica-ports) ports_csv=${2:?}; shift 2 ;;
        --stats-port) stats_port=${2:?}; shift 2 ;;
        --state-dir) state=${2:?}; shift 2 ;;
        --drain-seconds) drain=${2:?}; shift 2 ;;
        --grace-seconds) grace=${2:?}; shift 2 ;;
        --no-restart) restart=0; shift ;;
        --) shift; serve_extra=("$@"); break ;;
        *) die "unknown option '$1' (see the header of $0)" ;;
    esac
done
[[ ${#weights[@]} -gt 0 ]] || weights=(--synthetic)
for v in cores_per lb_port stats_port; do
    [[ ${!v} =~ ^[0-9]+$ && ${!v} -ge 1 ]] || die "--${v//_/-} must be a whole number >= 1, got '${!v}'"
done

bin=${GPT2_BIN:-$here/../target/release/gpt2}
[[ -x $bin ]] || die "no gpt2 binary at $bin: build it (cargo build --release) or set GPT2_BIN"
command -v haproxy >/dev/null || die "haproxy is not installed (Debian: apt-get install haproxy)"
command -v taskset >/dev/null || die "taskset is not installed (Debian: util-linux)"

# The cores this process may run on, as a list, so pinning respects a
# cgroup or an outer taskset.
allowed=()
IFS=, read -r -a ranges <<<"$(taskset -cp $$ | sed 's/.*: *//')"
for r in "${ranges[@]}"; do
    if [[ $r == *-* ]]; then allowed+=($(seq "${r%-*}" "${r#*-}")); else allowed+=("$r"); fi
done
need=$((replicas * cores_per))
[[ $need -le ${#allowed[@]} ]] ||
    die "$replicas replicas x $cores_per cores = $need cores, but only ${#allowed[@]} are available (${allowed[*]}): replicas would share cores"

if [[ -n $ports_csv ]]; then
    IFS=, read -r -a ports <<<"$ports_csv"
    [[ ${#ports[@]} -eq $replicas ]] || die "--replica-ports lists ${#ports[@]} ports for $replicas replicas"
else
    ports=()
    for ((i = 0; i < replicas; i++)); do ports+=($((lb_port + 1 + i))); done
fi

if [[ -z $state ]]; then
    state=$(mktemp -d "${TMPDIR:-/tmp}/gpt2-cluster.XXXXXX")
else
    mkdir -p "$state"
fi
rm -f "$state"/replica-*.pid "$state/stopping"

# The committed config, its example servers replaced by ours.
cfg=$state/haproxy.cfg
{
    grep -v -E '^\s*server\s' "$here/haproxy.cfg" | sed '/^frontend stats/,$d'
    for ((i = 0; i < replicas; i++)); do echo "    server r$i 127.0.0.1:${ports[i]}"; done
    echo
    sed -n '/^frontend stats/,$p' "$here/haproxy.cfg"
} >"$cfg"
export GPT2_LB_BIND=127.0.0.1:$lb_port GPT2_STATS_BIND=127.0.0.1:$stats_port
haproxy -c -q -f "$cfg" || die "HAProxy refuses $cfg"

supervisors=()
haproxy_pid=""
# The replicas and HAProxy run in sessions of their own (setsid), so that a
# Ctrl-C in this terminal reaches only this script, which then stops them in
# order: replicas first (each drains and finishes its requests), HAProxy last.
stop_all() {
    trap - EXIT INT TERM
    touch "$state/stopping"
    say "stopping: the replicas (SIGTERM: drain, finish, exit), then HAProxy"
    local f pids=() p deadline
    for f in "$state"/replica-*.pid; do [[ -e $f ]] && pids+=("$(cat "$f")"); done
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    # Each replica gets its drain and grace periods, and a margin.
    deadline=$((SECONDS + ${drain%.*} + ${grace%.*} + 5))
    for p in "${pids[@]}"; do
        while kill -0 "$p" 2>/dev/null && [[ $SECONDS -lt $deadline ]]; do sleep 0.2; done
        kill -KILL "$p" 2>/dev/null && say "replica pid $p did not stop in time: killed" || true
    done
    for p in "${supervisors[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
    # SIGUSR1: HAProxy's soft stop (it closes its listeners, lets open streams end).
    if [[ -n $haproxy_pid ]]; then
        kill -USR1 "$haproxy_pid" 2>/dev/null || true
        deadline=$((SECONDS + 10))
        while kill -0 "$haproxy_pid" 2>/dev/null && [[ $SECONDS -lt $deadline ]]; do sleep 0.2; done
        kill -KILL "$haproxy_pid" 2>/dev/null || true
    fi
    wait 2>/dev/null || true
    say "stopped; logs in $state"
}
trap 'stop_all; exit 130' INT
trap 'stop_all; exit 143' TERM
trap 'stop_all' EXIT

# Replica i: runs, and is run again when it exits, until the cluster stops.
supervise() {
    local i=$1 cores=$2 port=$3 pid status stopping=0
    trap - EXIT
    trap 'stopping=1' INT TERM
    while [[ $stopping -eq 0 && ! -e $state/stopping ]]; do
        setsid taskset -c "$cores" "$bin" serve --host 127.0.0.1 --port "$port" "${weights[@]}" \
            --threads "$cores_per" --drain-seconds "$drain" --grace-seconds "$grace" \
            "${serve_extra[@]}" >>"$state/replica-$i.log" 2>&1 &
        pid=$!
        echo "$pid" >"$state/replica-$i.pid"
        status=0
        wait "$pid" || status=$?
        # A signal to this shell ends `wait`, not the replica: wait for the replica itself.
        while kill -0 "$pid" 2>/dev/null; do
            status=0
            wait "$pid" || status=$?
        done
        [[ $stopping -eq 0 && ! -e $state/stopping ]] || break
        [[ $restart -eq 1 ]] || { say "replica $i (pid $pid) exited with status $status; not restarting"; break; }
        say "replica $i (pid $pid) exited with status $status; restarting it in 1 s"
        sleep 1
    done
}

for ((i = 0; i < replicas; i++)); do
    first=$((i * cores_per))
    cores=$(IFS=,; echo "${allowed[*]:first:cores_per}")
    say "replica $i: cores $cores, --threads $cores_per, http://127.0.0.1:${ports[i]}, log $state/replica-$i.log"
    supervise "$i" "$cores" "${ports[i]}" &
    supervisors+=($!)
done
setsid haproxy -db -f "$cfg" >>"$state/haproxy.log" 2>&1 &
haproxy_pid=$!
echo "$haproxy_pid" >"$state/haproxy.pid"
say "HAProxy: http://127.0.0.1:$lb_port (stats: http://127.0.0.1:$stats_port/stats), log $state/haproxy.log"

# Ready once HAProxy's stats list every replica UP (loading the weights takes a while).
up_count() {
    local csv
    csv=$({ exec 3<>"/dev/tcp/127.0.0.1/$stats_port"; } 2>/dev/null &&
        printf 'GET /stats;csv HTTP/1.0\r\n\r\n' >&3 && cat <&3) || return 0
    grep -c -E '^replicas,r[0-9]+,([^,]*,){15}UP' <<<"$csv" || true
}
deadline=$((SECONDS + 300))
until [[ $(up_count) -eq $replicas ]]; do
    kill -0 "$haproxy_pid" 2>/dev/null || die "HAProxy exited; see $state/haproxy.log"
    [[ $SECONDS -lt $deadline ]] || die "not every replica came up within 300 s; see $state/replica-*.log"
    sleep 0.3
done
say "ready: http://127.0.0.1:$lb_port ($replicas replicas, $cores_per cores each; state $state)"
wait "$haproxy_pid"
