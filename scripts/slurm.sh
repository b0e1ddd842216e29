#!/usr/bin/env bash
# A real single-node Slurm cluster for the tests, everything in one scratch directory
# (see shared/SLURM.md for the measured facts this follows). Needs root: slurmd runs
# jobs as any user, and the packages are installed with apt if missing.
#
#   scripts/slurm.sh start DIR    (re)start a cluster in DIR; prints SLURM_CONF=DIR/etc/slurm.conf
#   scripts/slurm.sh stop DIR     stop it (idempotent)
#   scripts/slurm.sh status DIR   exit 0 if its controller answers
#
# Only the SLURM_CONF line goes to stdout, so `conf=$(scripts/slurm.sh start d)` works;
# the daemons run in their own sessions with every fd redirected, so they neither hold
# the caller's stdout open nor die with the caller's shell.
set -euo pipefail

die() {
    echo "slurm.sh: $*" >&2
    exit 1
}

usage() {
    echo "usage: $0 start|stop|status DIR" >&2
    exit 2
}

[ $# -eq 2 ] || usage
cmd=$1
# Absolute, because slurm.conf must spell every path out: Slurm expands no variables.
D=$(realpath -m -- "$2")
CONF=$D/etc/slurm.conf
export SLURM_CONF=$CONF

# Our own PID files (Slurm's and munge's own live next to them under other names): the
# PID each daemon was started with, checked against its name before it is signalled,
# so that a recycled PID is never killed.
pidfile() { echo "$D/run/$1.daemon.pid"; }

running() { # PID NAME: PID is a live process called NAME (a zombie counts as gone: the
    # daemons' parent is init, which reaps them only now and then)
    [ "$(cat "/proc/$1/comm" 2>/dev/null)" = "$2" ] || return 1
    [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]
}

alive() { # NAME: the PID of our daemon NAME if it still runs, else nothing
    local f pid
    f=$(pidfile "$1")
    [ -f "$f" ] || return 1
    pid=$(cat "$f" 2>/dev/null) || return 1
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    running "$pid" "$1" || return 1
    echo "$pid"
}

stop_one() { # NAME: TERM, up to 3 s, then KILL
    local pid
    if pid=$(alive "$1"); then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 30); do
            running "$pid" "$1" || break
            sleep 0.1
        done
        if running "$pid" "$1"; then
            echo "slurm.sh: $1 ($pid) ignored SIGTERM for 3 s; killing it" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$(pidfile "$1")"
}

# slurmstepd processes (one per running job step) outlive slurmd. Ours are those whose
# environment names our slurm.conf: slurmd passes its own environment on to them.
our_stepds() {
    local p
    for p in $(pgrep -x slurmstepd 2>/dev/null || true); do
        # (It may end between pgrep and here: hence the braces around the redirection.)
        if { tr '\0' '\n' <"/proc/$p/environ"; } 2>/dev/null | grep -qxF "SLURM_CONF=$CONF"; then
            echo "$p"
        fi
    done
}

# Everything our jobs left behind: our slurmstepds, their descendants (a job's processes
# are reparented to init as soon as its slurmstepd dies, so they are collected first),
# and job processes already orphaned (they carry SLURM_JOB_ID and, from the submitter's
# environment, our SLURM_CONF).
our_job_procs() {
    local d p stat env
    local -A parent=() ours=()
    for d in /proc/[0-9]*; do
        p=${d#/proc/}
        [ "$p" = "$$" ] || [ "$p" = "$BASHPID" ] && continue
        stat=$(cat "$d/stat" 2>/dev/null) || continue
        stat=${stat##*) } # after the command name, which may hold spaces
        set -- $stat      # state, ppid, ...
        [ "$1" = Z ] && continue
        parent[$p]=$2
        env=$({ tr '\0' '\n' <"$d/environ"; } 2>/dev/null) || continue
        grep -qxF "SLURM_CONF=$CONF" <<<"$env" || continue
        if [ "$(cat "$d/comm" 2>/dev/null)" = slurmstepd ] || grep -q '^SLURM_JOB_ID=' <<<"$env"; then
            ours[$p]=1
        fi
    done
    local changed=1
    while [ -n "$changed" ]; do
        changed=
        for p in "${!parent[@]}"; do
            if [ -z "${ours[$p]:-}" ] && [ -n "${ours[${parent[$p]}]:-}" ]; then
                ours[$p]=1
                changed=1
            fi
        done
    done
    echo "${!ours[@]}"
}

answers() { # the controller answers and knows the node
    [ -f "$CONF" ] || return 1
    timeout 10 sinfo -h -o %T 2>/dev/null | grep -q .
}

do_stop() {
    # Cancel what still runs while the controller can do it cleanly (job scripts get
    # their TERM, then KILL after KillWait); then the daemons in reverse order.
    if alive slurmctld >/dev/null && alive slurmd >/dev/null && answers; then
        local jobs
        jobs=$(timeout 10 squeue -h -o %i 2>/dev/null || true)
        if [ -n "$jobs" ]; then
            # shellcheck disable=SC2086 # one word per job
            timeout 10 scancel --quiet $jobs 2>/dev/null || true
            # (KillWait=5: a job script that traps TERM has up to 5 s.)
            for _ in $(seq 1 60); do
                [ -z "$(our_stepds)" ] && break
                sleep 0.1
            done
        fi
    fi
    stop_one slurmd
    stop_one slurmctld
    # Whatever the jobs left (slurmctld could not cancel them, or it was killed) loses
    # its daemons: end it too.
    local left
    left=$(our_job_procs)
    if [ -n "$left" ]; then
        echo "slurm.sh: ending job processes left behind: $left" >&2
        kill -TERM $left 2>/dev/null || true
        sleep 1
        kill -KILL $left 2>/dev/null || true
    fi
    stop_one munged
}

logs_tail() {
    local f
    for f in "$D"/log/*; do
        [ -f "$f" ] || continue
        echo "---- tail of $f" >&2
        tail -n 25 "$f" >&2
    done
}

fail() {
    echo "slurm.sh: $*" >&2
    logs_tail
    do_stop >/dev/null 2>&1 || true
    exit 1
}

port_busy() { # PORT: something on this machine listens on it (IPv4 or IPv6)
    local hex
    hex=$(printf '%04X' "$1")
    cat /proc/net/tcp /proc/net/tcp6 2>/dev/null \
        | awk -v p=":$hex" '$4 == "0A" && substr($2, length($2) - 4) == p { found = 1 } END { exit !found }'
}

spawn() { # NAME LOG CMD...: start a daemon in its own session, detached from our fds
    local name=$1 log=$2
    shift 2
    # setsid: its own session, so the caller's shell ending (or its SIGHUP/SIGINT) does
    # not reach it; a background child of a script is no group leader, so setsid execs
    # in place and $! is the daemon's own PID.
    setsid nohup "$@" </dev/null >>"$log" 2>&1 &
    echo $! >"$(pidfile "$name")"
}

do_start() {
    local missing=
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v sbatch >/dev/null && command -v munged >/dev/null || missing=1
    if [ -n "$missing" ]; then
        echo "slurm.sh: installing slurm-wlm and munge" >&2
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            --no-install-recommends slurm-wlm munge; } >&2 \
            || die "could not install slurm-wlm and munge with apt-get"
        hash -r
        for c in slurmctld slurmd sbatch sinfo munged; do
            command -v "$c" >/dev/null || die "$c is still missing after installing slurm-wlm and munge"
        done
    fi
    [ "$(id -u)" = 0 ] || die "must run as root (slurmd runs jobs as their users)"

    # A cluster from an earlier run in the same DIR: stop it and start from nothing (job
    # ids then restart at 1).
    if [ -d "$D/run" ]; then do_stop; fi
    mkdir -p "$D"
    rm -rf "$D/etc" "$D/run" "$D/state" "$D/spool" "$D/log"
    # munged refuses directories that others may write to: keep ours 0755.
    (umask 022 && mkdir -p "$D"/{etc,run,state,spool,log})
    chmod 0755 "$D" "$D"/{etc,run,state,spool,log}

    local host cpus mem ctld_port slurmd_port
    host=$(hostname -s)
    cpus=$(nproc)
    # RealMemory may not exceed what slurmd finds (else the node is drained); 90% of the
    # free memory leaves room, and jobs here ask for little.
    mem=$(free -m | awk '/^Mem:/ { m = int($4 * 0.9); if (m < 100) m = 100; print m }')
    # Two clusters on one machine (two test runs at once) each need their own ports.
    ctld_port=16817
    while port_busy "$ctld_port" || port_busy $((ctld_port + 1)); do
        ctld_port=$((ctld_port + 2))
        [ "$ctld_port" -lt 17817 ] || die "no free pair of ports in 16817-17817"
    done
    slurmd_port=$((ctld_port + 1))

    # The munge key: 128 random bytes, readable by its owner only (munged checks).
    head -c 128 /dev/urandom >"$D/etc/munge.key"
    chmod 0400 "$D/etc/munge.key"

    cat >"$CONF" <<EOF
# Written by scripts/slurm.sh: a single-node test cluster, everything under $D.
ClusterName=granuletest
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket=$D/run/munge.sock
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool
SlurmctldPidFile=$D/run/slurmctld.pid
SlurmdPidFile=$D/run/slurmd.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd.log
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
KillWait=5
MinJobAge=300
SchedulerParameters=batch_sched_delay=0
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=00:30:00 State=UP
EOF

    # --force: munged otherwise refuses some setups as root (e.g. a socket directory
    # whose ancestors others may write to, like a TMPDIR without the sticky bit).
    spawn munged "$D/log/munged.out" munged -F --force \
        --key-file="$D/etc/munge.key" --socket="$D/run/munge.sock" \
        --pid-file="$D/run/munged.pid" --log-file="$D/log/munged.log" \
        --seed-file="$D/state/munged.seed"
    for _ in $(seq 1 100); do
        [ -S "$D/run/munge.sock" ] && break
        alive munged >/dev/null || fail "munged exited at start"
        sleep 0.1
    done
    [ -S "$D/run/munge.sock" ] || fail "munged made no socket in 10 s"

    spawn slurmctld "$D/log/slurmctld.out" slurmctld -D -f "$CONF"
    spawn slurmd "$D/log/slurmd.out" slurmd -D -f "$CONF"

    local deadline=$((SECONDS + 60)) state=
    while :; do
        # (sinfo keeps retrying a controller that is not up yet: hence the checks first.)
        alive slurmctld >/dev/null || fail "slurmctld exited at start"
        alive slurmd >/dev/null || fail "slurmd exited at start"
        state=$(timeout 5 sinfo -h -o %T 2>/dev/null || true)
        grep -qx idle <<<"$state" && break
        [ "$SECONDS" -lt "$deadline" ] || fail "the node is not idle after 60 s (sinfo says: ${state:-nothing})"
        sleep 0.2
    done
    echo "SLURM_CONF=$CONF"
}

case "$cmd" in
start) do_start ;;
stop) do_stop ;;
status) alive munged >/dev/null && answers ;;
*) usage ;;
esac
