#!/usr/bin/env bash
# cluster.sh -- the project's dev Slurm cluster: one real Slurm on this machine, with a single node on
# localhost (the default) or two compute nodes, each slurmd in its own network namespace.
#
# Every daemon (munged, mariadbd, slurmdbd, slurmctld, slurmd) is started by hand -- no systemd --
# with its config, state, logs, sockets and pid file under one short directory, and is stopped by
# the PID saved there (never by name: other Slurm installations on the machine are left alone).
#
# Usage:  bash slurm/cluster.sh install   # apt-get the Debian/Ubuntu packages if missing (root)
#         bash slurm/cluster.sh start     # idempotent: no-op if every daemon runs, else a cold start;
#                                         # progress -> stderr, "export SLURM_CONF=..." -> stdout
#         bash slurm/cluster.sh stop      # cancel all jobs, stop the daemons (idempotent)
#         bash slurm/cluster.sh status    # exit 0 iff the cluster is up (prints sinfo/squeue)
#         bash slurm/cluster.sh env       # print the export line again
#         bash slurm/cluster.sh purge     # stop, then delete the whole directory (only one this script made)
#
# Two compute nodes (ALIT_SLURM_NODES=2): a separate cluster -- its own directory and ports, so it runs
# beside the single-node one -- whose nodes alitn1 and alitn2 each run a slurmd in their own network
# namespace (ip netns), UTS namespace (hostname = node name) and mount namespace (a private /etc/hosts
# naming the nodes, bind-mounted there only). A veth pair per namespace joins a bridge that holds the
# controller's address ($NET.254); the nodes are $NET.1 and $NET.2. Nothing else on the machine changes
# (no /etc/hosts edit, no route or sysctl beyond the bridge's own subnet), and stop/purge delete the
# namespaces, veths and bridge this cluster created (recorded in run/net) and nothing else.
#   eval "$(ALIT_SLURM_NODES=2 bash slurm/cluster.sh start)"   # then: sbatch -N2 ..., alit train --nodes 2
#   ALIT_SLURM_NODES=2 bash slurm/cluster.sh stop
#
# The directory is created fresh with mode 0700 and a marker file holding the creating uid; a directory
# that exists without that marker (or with another owner) is refused with exit status 2, by every command,
# and is never deleted.
#
# On a laptop or in CI:
#   sudo bash slurm/cluster.sh install
#   trap 'bash slurm/cluster.sh stop' EXIT   # set the trap first: a failed start may leave daemons up
#   eval "$(bash slurm/cluster.sh start)"    # exports SLURM_CONF; then sbatch/srun/sinfo/submitit work
#
# Settings (environment):
#   ALIT_SLURM_DIR          base directory (default ${TMPDIR:-/tmp}/alit-slurm, with 2 nodes .../alit-slurm2n).
#                           Keep it SHORT (< ~55 chars): unix socket paths (munge, mariadb, slurmd step
#                           sockets) must be < 108 bytes.
#   ALIT_SLURM_NODES        1 (default): one node, "localhost". 2: nodes alitn1 + alitn2 in network
#                           namespaces (needs iproute2 and CAP_NET_ADMIN/CAP_SYS_ADMIN, i.e. root).
#   ALIT_SLURM_NET          with 2 nodes: the first three octets of the private /24 (default 10.77.0);
#                           refused if any address or route of the machine is already in it.
#   ALIT_SLURM_ACCOUNTING   1 (default): also run mariadbd + slurmdbd, so `sacct` works. submitit reads
#                           job states with sacct; without it a job killed before writing its result
#                           makes `job.result()` wait forever. 0: no accounting (faster start).
#   ALIT_SLURM_CPUS         CPUs each node advertises (default: the hardware's; with 2 nodes at least 4).
#                           More than the real count lets more 1-CPU jobs run at once.
#   ALIT_SLURM_PORT_BASE    slurmctld port (default 6817, with 2 nodes 6827); slurmd +1, slurmdbd +2,
#                           mariadbd +3.
#   ALIT_SLURM_PARTITION    the (default) partition's name (default debug).
#   ALIT_SLURM_TIMEOUT      seconds to wait for each daemon (default 60).
#   ALIT_SLURM_SMOKE        1 (default): run `srun true` at the end of start.
#   ALIT_SLURM_KEEP_STATE   0 (default): a cold start wipes the saved state, spool, logs and the
#                           accounting database (stale "running" jobs would keep the node busy). 1: keep.
#   ALIT_SLURM_FIRST_JOB_ID first job id of a cold cluster (default: derived from the clock, so ids do
#                           not repeat across runs and a reused submitit folder cannot return an old
#                           run's result).
set -euo pipefail
export PATH=$PATH:/usr/sbin:/sbin # the daemons live in sbin, often not on a user's PATH

NODES=${ALIT_SLURM_NODES:-1}
case $NODES in
1)
    DIR=${ALIT_SLURM_DIR:-${TMPDIR:-/tmp}/alit-slurm}
    PORT=${ALIT_SLURM_PORT_BASE:-6817}
    ;;
2)
    DIR=${ALIT_SLURM_DIR:-${TMPDIR:-/tmp}/alit-slurm2n}
    PORT=${ALIT_SLURM_PORT_BASE:-6827}
    ;;
*)
    echo "[alit-slurm] ERROR: ALIT_SLURM_NODES must be 1 or 2, got '$NODES'" >&2
    exit 2
    ;;
esac
DIR=${DIR%/}
ACCOUNTING=${ALIT_SLURM_ACCOUNTING:-1}
CPUS=${ALIT_SLURM_CPUS:-}
NET=${ALIT_SLURM_NET:-10.77.0}
PARTITION=${ALIT_SLURM_PARTITION:-debug}
TIMEOUT=${ALIT_SLURM_TIMEOUT:-60}
SMOKE=${ALIT_SLURM_SMOKE:-1}
KEEP_STATE=${ALIT_SLURM_KEEP_STATE:-0}
NODE=localhost # the node is "localhost" whatever the hostname: nothing depends on DNS
if ((NODES == 2)); then
    [[ $NET =~ ^(25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])(\.(25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])){2}$ ]] || {
        echo "[alit-slurm] ERROR: ALIT_SLURM_NET must be three octets such as 10.77.0, got '$NET'" >&2
        exit 2
    }
    NODE_NAMES=(alitn1 alitn2) # = the netns names and the hostnames inside them
    NODE=alitn1
    CTLD_ADDR=$NET.254
    BRIDGE=alitbr0
else
    NODE_NAMES=(localhost)
    CTLD_ADDR=127.0.0.1
fi
MARKER_FILE=$DIR/.alit-slurm-dir # "created by slurm/cluster.sh uid=<uid>", written when the dir is made

CONF=$DIR/etc/slurm.conf
MUNGE_SOCK=$DIR/munge/munge.socket
MYSQL_SOCK=$DIR/mysql/mysqld.sock
SLURMD_PORT=$((PORT + 1))
DBD_PORT=$((PORT + 2))
DB_PORT=$((PORT + 3))

# Clients must find the config through SLURM_CONF (else they try a DNS SRV lookup and fail with
# "Could not establish a configuration source"); jobs inherit it.
export SLURM_CONF=$CONF
# Every daemon started here carries this marker in its environment: a PID is only ever killed when
# /proc/PID/environ holds it (safe against PID reuse and against other clusters on the machine).
export ALIT_SLURM_MARKER=$DIR

log() { printf '[alit-slurm %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}
refuse() { # exit 2: a usage problem the user must resolve (nothing was changed)
    log "ERROR: $*"
    exit 2
}
need_root() { [[ $(id -u) == 0 ]] || die "$1 needs root (apt-get; the daemons run with SlurmUser=root)"; }
accounting() { [[ $ACCOUNTING == 1 ]]; }
two_nodes() { ((NODES == 2)); }
# per-node files: the single node keeps the names it always had; with 2 nodes slurm.conf uses %n
slurmd_pidfile() { if two_nodes; then echo "$DIR/run/slurmd-$1.pid"; else echo "$DIR/run/slurmd.pid"; fi; }
slurmd_logfile() { if two_nodes; then echo "$DIR/log/slurmd-$1.log"; else echo "$DIR/log/slurmd.log"; fi; }
tail_log() { if [[ -f $1 ]]; then tail -n 25 "$1" >&2; fi; }

# ============================================================================ the directory
# The directory holds root daemons' configs, keys and pid files, and sits at a predictable path in the
# shared temp dir: it is made fresh (mkdir fails if anything exists there, a symlink included) with mode
# 0700 and a marker holding the creating uid. An existing directory is used (or stopped, or deleted) only
# when it is a real directory owned by us, not writable by others, with our marker inside.
dir_problem() { # why $DIR may not be used, or nothing
    local uid mode
    uid=$(id -u)
    if [[ -L $DIR ]]; then echo "it is a symbolic link"; return; fi
    if [[ ! -d $DIR ]]; then echo "it is not a directory"; return; fi
    if [[ $(stat -c %u "$DIR") != "$uid" ]]; then echo "it is owned by uid $(stat -c %u "$DIR"), not $uid"; return; fi
    mode=$(stat -c %a "$DIR")
    if (((8#$mode & 8#022) != 0)); then echo "it is writable by others (mode $mode)"; return; fi
    if [[ -L $MARKER_FILE || ! -f $MARKER_FILE ]]; then
        echo "it has no marker file ${MARKER_FILE##*/}: slurm/cluster.sh did not create it"
        return
    fi
    if [[ $(stat -c %u "$MARKER_FILE") != "$uid" || $(cat "$MARKER_FILE" 2>/dev/null) != "created by slurm/cluster.sh uid=$uid" ]]; then
        echo "its marker file ${MARKER_FILE##*/} was not written by uid $uid"
    fi
}
check_dir() { # refuse (exit 2) a directory this script did not create
    local why
    why=$(dir_problem)
    [[ -z $why ]] || refuse "refusing to use $DIR: $why. It is left untouched: remove it yourself if it is" \
        "yours, or choose another directory with ALIT_SLURM_DIR"
}
claim_dir() { # make $DIR fresh (0700 + marker), or check the one there
    if [[ ! -e $DIR && ! -L $DIR ]]; then
        mkdir -p "$(dirname "$DIR")"
        if (umask 077 && mkdir "$DIR") 2>/dev/null; then
            chmod 700 "$DIR"
            (umask 077 && echo "created by slurm/cluster.sh uid=$(id -u)" >"$MARKER_FILE")
            log "created $DIR (mode 0700)"
            return 0
        fi
    fi
    check_dir # it existed (or appeared just now)
}

# ============================================================================ processes
pid_of() { # pidfile -> its pid, or nothing
    if [[ -s $1 ]]; then tr -dc '0-9' <"$1"; fi
}
regex_quote() { sed 's/[][\.*^$(){}?+|]/\\&/g' <<<"$1"; }
env_has() { # pid regex: does one whole entry of /proc/pid/environ match regex?
    local entries
    entries=$'\n'$(tr '\0' '\n' 2>/dev/null <"/proc/$1/environ")$'\n' || return 1
    [[ $entries =~ $'\n'$2$'\n' ]]
}
is_ours() { # pid comm: alive, not a zombie, named comm, and carrying our marker
    local pid=$1 comm=$2
    [[ -n $pid && -d /proc/$pid ]] || return 1
    [[ $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) != Z ]] || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$comm" ]] || return 1
    env_has "$pid" "ALIT_SLURM_MARKER=$(regex_quote "$DIR")"
}
running() { is_ours "$(pid_of "$1")" "$2"; } # pidfile comm

wait_for() { # description command... : retry the command every 0.1 s for up to TIMEOUT seconds
    local what=$1 end=$((SECONDS + TIMEOUT))
    shift
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < end)) || {
            log "timed out after ${TIMEOUT}s waiting for $what"
            return 1
        }
        sleep 0.1
    done
}
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
port_free() { # port what
    ! port_open "$1" || die "port $1 (for $2) is in use: another cluster? set ALIT_SLURM_PORT_BASE"
}

stop_pid() { # pid comm: SIGTERM, wait up to 15 s, then SIGKILL -- only if the process is ours
    local pid=$1 comm=$2 i
    is_ours "$pid" "$comm" || return 0
    log "stopping $comm (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 150; i++)); do
        is_ours "$pid" "$comm" || return 0
        sleep 0.1
    done
    log "$comm (pid $pid) ignored SIGTERM for 15 s: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
}

# Daemons are started with stdin from /dev/null, output to a log file and EVERY other inherited file
# descriptor closed: munged, mariadbd and slurmdbd would otherwise keep our lock file open
# (deadlocking the next start/stop) or a CI runner's pipe (which then waits forever for EOF).
close_fds() {
    local fd
    for fd in /proc/$BASHPID/fd/*; do
        fd=${fd##*/}
        if ((fd > 2)); then eval "exec $fd>&-" 2>/dev/null; fi
    done
    return 0
}
spawn() { # logfile command... (a daemon that forks itself into the background)
    local logfile=$1
    shift
    (close_fds && exec "$@") </dev/null >>"$logfile" 2>&1
}
spawn_detached() { # logfile command... (a daemon that stays in the foreground: detach it with setsid)
    local logfile=$1
    shift
    (close_fds && exec setsid "$@") </dev/null >>"$logfile" 2>&1 &
}

# ============================================================================ install
install() {
    need_root install
    local pkgs="slurmctld slurmd slurm-client munge" bins="slurmctld slurmd sbatch munged mungekey" b missing=0
    if accounting; then
        pkgs+=" slurmdbd mariadb-server"
        bins+=" slurmdbd mariadbd mariadb-install-db"
    fi
    if two_nodes; then # ip netns + veth + bridge; nsenter and unshare come with util-linux
        pkgs+=" iproute2"
        bins+=" ip nsenter unshare"
    fi
    for b in $bins; do command -v "$b" >/dev/null || missing=1; done
    if ((missing == 0)); then
        log "packages already installed"
        return 0
    fi
    command -v apt-get >/dev/null ||
        die "no apt-get: install the packages $pkgs (or your system's equivalents) by hand"
    # Keep the packages' postinst scripts from starting system-wide munge/mariadb services (without
    # systemd, invoke-rc.d falls back to /etc/init.d scripts): a policy-rc.d that denies every start.
    local own_policy=0 rc=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && own_policy=1
    fi
    log "apt-get install $pkgs"
    {
        DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $pkgs >/dev/null
    } || rc=$?
    if ((own_policy)); then rm -f /usr/sbin/policy-rc.d; fi
    ((rc == 0)) || die "apt-get failed (rc=$rc)"
    log "installed"
}

# ============================================================================ configuration
write_configs() {
    mkdir -p "$DIR"/{etc,munge,state,spool,log,run,mysql}
    if two_nodes; then
        local n
        for n in "${NODE_NAMES[@]}"; do mkdir -p "$DIR/spool/$n"; done
    else
        mkdir -p "$DIR/spool/slurmd"
    fi
    # munged refuses a socket directory that others cannot traverse: 0755 (inside the 0700 $DIR)
    chmod 755 "$DIR/munge" "$DIR/etc"
    if [[ ! -s $DIR/munge/munge.key ]]; then
        mungekey --create --keyfile="$DIR/munge/munge.key" 2>/dev/null ||
            dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    fi
    chmod 600 "$DIR/munge/munge.key"

    # The node line comes from the hardware (`slurmd -C`): a mismatch drains the node. ALIT_SLURM_CPUS
    # advertises another CPU count (config_overrides makes slurmd accept it).
    local hw mem overrides=""
    hw=$(slurmd -C | head -n 1) || die "slurmd -C failed"
    if two_nodes && [[ -z $CPUS ]]; then # two nodes share the machine: each advertises >= 4 CPUs
        CPUS=$(nproc)
        ((CPUS >= 4)) || CPUS=4
    fi
    if [[ -n $CPUS ]]; then
        mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")
        hw="CPUs=$CPUS RealMemory=$mem"
        overrides="SlurmdParameters=config_overrides"
    else
        hw=$(sed 's/^NodeName=[^ ]* //' <<<"$hw")
    fi

    # A wiped cluster would count job ids from 1 again, and submitit would then return the stale
    # <folder>/<id>_0_result.pkl of an earlier run that used the same folder. So each cold cluster
    # starts at a clock-derived id (at most 60,000,001, below Slurm's default MaxJobId 67,043,328).
    local first_id=${ALIT_SLURM_FIRST_JOB_ID:-$((($(date +%s) % 6000000) * 10 + 1))}

    local acct
    if accounting; then
        acct="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
# the munge socket of the slurmctld <-> slurmdbd link is given here (AuthInfo does not reach it)
AccountingStoragePass=$MUNGE_SOCK
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30"
    else
        acct="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
    fi

    local cluster_name=alitdev nodes_conf slurmd_files n i=0
    if two_nodes; then
        cluster_name=alitdev2n
        # each slurmd substitutes its own node name for %n
        slurmd_files="SlurmdSpoolDir=$DIR/spool/%n
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmdLogFile=$DIR/log/slurmd-%n.log"
        nodes_conf=""
        for n in "${NODE_NAMES[@]}"; do
            i=$((i + 1))
            nodes_conf+="NodeName=$n NodeAddr=$NET.$i NodeHostname=$n $hw State=UNKNOWN"$'\n'
        done
        nodes_conf+="PartitionName=$PARTITION Nodes=$(
            IFS=,
            echo "${NODE_NAMES[*]}"
        ) Default=YES MaxTime=INFINITE State=UP"
    else
        slurmd_files="SlurmdSpoolDir=$DIR/spool/slurmd
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmdLogFile=$DIR/log/slurmd.log"
        nodes_conf="NodeName=$NODE NodeAddr=127.0.0.1 $hw State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP"
    fi

    cat >"$CONF.tmp" <<EOF
# generated by alit-stack slurm/cluster.sh: a ${NODES}-node dev cluster on this machine
ClusterName=$cluster_name
# "localhost" matches whatever the hostname; the address is where slurmd and clients reach it
SlurmctldHost=localhost($CTLD_ADDR)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket=$MUNGE_SOCK,cred_expire=5
StateSaveLocation=$DIR/state
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
$slurmd_files
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups: works in containers and VMs without a delegated cgroup tree
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SwitchType=switch/none
MpiDefault=none
JobCompType=jobcomp/none
$acct
FirstJobId=$first_id
ReturnToService=2
MailProg=/bin/true
KillWait=5
InactiveLimit=0
MinJobAge=300
# batch_sched_delay=0: else every batch job waits ~3 s before it is considered;
# sched_interval/bf_interval=2: requeued jobs start again within ~2 s, not 30-60 s
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=2
$overrides
$nodes_conf
EOF
    mv -f "$CONF.tmp" "$CONF"

    if accounting; then
        # slurmdbd has no -f option: it reads slurmdbd.conf beside SLURM_CONF, and only if mode 0600
        (
            umask 077
            cat >"$DIR/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCK
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
        )
        chmod 600 "$DIR/etc/slurmdbd.conf"
        # mariadbd runs this file at every start. A cold start empties the accounting database
        # (re-initialising the whole MariaDB data directory instead would cost ~6 s).
        {
            if [[ $KEEP_STATE != 1 ]]; then echo "DROP DATABASE IF EXISTS slurm_acct_db;"; fi
            cat <<'EOF'
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
EOF
        } >"$DIR/mysql/init.sql"
    fi
    printf 'export SLURM_CONF=%q\n' "$CONF" >"$DIR/env.sh"
}

# ============================================================================ daemons
start_munged() {
    running "$DIR/munge/munged.pid" munged && return 0
    rm -f "$MUNGE_SOCK" "$MUNGE_SOCK.lock"
    # --force: munged wants every ancestor of its socket traversable by all; $DIR is 0700 on purpose (only
    # root -- the daemons and the jobs -- talks to munge here), which --force turns into a warning
    spawn "$DIR/log/munged.stdio" munged --force --socket="$MUNGE_SOCK" --key-file="$DIR/munge/munge.key" \
        --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/log/munged.log" \
        --seed-file="$DIR/munge/munged.seed" || {
        tail_log "$DIR/log/munged.log"
        die "munged failed to start"
    }
    wait_for munged bash -c "munge -S '$MUNGE_SOCK' -n | unmunge -S '$MUNGE_SOCK'" || {
        tail_log "$DIR/log/munged.log"
        die "munged does not answer"
    }
    log "munged up (pid $(pid_of "$DIR/munge/munged.pid"))"
}

start_mariadb() {
    running "$DIR/mysql/mysqld.pid" mariadbd && return 0
    port_free "$DB_PORT" mariadbd
    if [[ ! -d $DIR/mysql/data/mysql ]]; then
        log "initialising the MariaDB data directory"
        mariadb-install-db --no-defaults --datadir="$DIR/mysql/data" --user=root \
            --auth-root-authentication-method=socket --skip-test-db \
            --innodb-log-file-size=16M >"$DIR/log/mariadb-install.log" 2>&1 || {
            tail_log "$DIR/log/mariadb-install.log"
            die "mariadb-install-db failed"
        }
    fi
    spawn_detached "$DIR/log/mariadb.log" mariadbd --no-defaults --datadir="$DIR/mysql/data" --user=root \
        --socket="$MYSQL_SOCK" --pid-file="$DIR/mysql/mysqld.pid" --port="$DB_PORT" \
        --bind-address=127.0.0.1 --log-error="$DIR/log/mariadb.log" --init-file="$DIR/mysql/init.sql" \
        --innodb-buffer-pool-size=256M --innodb-log-file-size=16M --innodb-lock-wait-timeout=900
    wait_for mariadbd mariadb-admin --no-defaults --socket="$MYSQL_SOCK" ping || {
        tail_log "$DIR/log/mariadb.log"
        die "mariadbd does not answer"
    }
    wait_for "the mariadbd pid file" running "$DIR/mysql/mysqld.pid" mariadbd || die "mariadbd wrote no pid file"
    log "mariadbd up (pid $(pid_of "$DIR/mysql/mysqld.pid"), port $DB_PORT)"
}

start_slurmdbd() { # before slurmctld, which registers with it
    running "$DIR/run/slurmdbd.pid" slurmdbd && return 0
    port_free "$DBD_PORT" slurmdbd
    spawn "$DIR/log/slurmdbd.stdio" slurmdbd || {
        tail_log "$DIR/log/slurmdbd.log"
        die "slurmdbd failed to start"
    }
    wait_for slurmdbd port_open "$DBD_PORT" || {
        tail_log "$DIR/log/slurmdbd.log"
        die "slurmdbd does not listen on port $DBD_PORT"
    }
    log "slurmdbd up (pid $(pid_of "$DIR/run/slurmdbd.pid"))"
}

start_slurmctld() {
    running "$DIR/run/slurmctld.pid" slurmctld && return 0
    port_free "$PORT" slurmctld
    spawn "$DIR/log/slurmctld.stdio" slurmctld -f "$CONF" || {
        tail_log "$DIR/log/slurmctld.log"
        die "slurmctld failed to start"
    }
    wait_for slurmctld bash -c 'scontrol ping | grep -q "is UP"' || {
        tail_log "$DIR/log/slurmctld.log"
        die "slurmctld does not answer"
    }
    log "slurmctld up (pid $(pid_of "$DIR/run/slurmctld.pid"))"
}

# ============================================================================ two nodes: namespaces
# Every network object this cluster creates is recorded in run/net ("netns NAME" / "link NAME") BEFORE it
# is created, and only recorded objects are ever deleted; an object of the same name that is not in the
# record (another cluster's, the machine's) makes start refuse.
NET_RECORD=$DIR/run/net
recorded() { [[ -f $NET_RECORD ]] && grep -qxF "$1" "$NET_RECORD"; }
record() { echo "$1" >>"$NET_RECORD"; }
netns_exists() { [[ -e /run/netns/$1 ]]; }
link_exists() { ip link show dev "$1" >/dev/null 2>&1; }

setup_net() {
    command -v ip >/dev/null || die "two nodes need iproute2's 'ip' (apt-get install iproute2)"
    local n i=0 host_end
    # the private /24 must be unused by the machine (except by our own bridge)
    if ! recorded "link $BRIDGE" && ip -4 -o addr show | grep -q " inet $(regex_quote "$NET")\.[0-9]*/"; then
        refuse "the machine already has an address in $NET.0/24: set ALIT_SLURM_NET to an unused /24"
    fi
    if ! recorded "link $BRIDGE" && [[ -n $(ip -4 route show "$NET.0/24" 2>/dev/null) ]]; then
        refuse "the machine already routes $NET.0/24: set ALIT_SLURM_NET to an unused /24"
    fi
    # refuse before creating anything: a same-named object this cluster did not create is left alone
    link_exists "$BRIDGE" && ! recorded "link $BRIDGE" &&
        refuse "a network interface '$BRIDGE' exists that this cluster did not create: leaving it alone"
    for n in "${NODE_NAMES[@]}"; do
        i=$((i + 1))
        netns_exists "$n" && ! recorded "netns $n" &&
            refuse "a network namespace '$n' exists that this cluster did not create: leaving it alone"
        link_exists "alitv$i" && ! recorded "link alitv$i" &&
            refuse "a network interface 'alitv$i' exists that this cluster did not create: leaving it alone"
    done
    i=0
    if ! link_exists "$BRIDGE"; then
        recorded "link $BRIDGE" || record "link $BRIDGE"
        ip link add "$BRIDGE" type bridge || die "cannot create the bridge $BRIDGE (needs CAP_NET_ADMIN)"
        ip addr add "$CTLD_ADDR/24" dev "$BRIDGE"
        ip link set "$BRIDGE" up
    elif ! recorded "link $BRIDGE"; then
        refuse "a network interface '$BRIDGE' exists that this cluster did not create: leaving it alone"
    fi
    for n in "${NODE_NAMES[@]}"; do
        i=$((i + 1))
        host_end=alitv$i
        if netns_exists "$n"; then
            recorded "netns $n" || refuse "a network namespace '$n' exists that this cluster did not create"
        else
            recorded "netns $n" || record "netns $n"
            ip netns add "$n" || die "cannot create the network namespace $n (needs CAP_SYS_ADMIN)"
        fi
        if link_exists "$host_end"; then
            recorded "link $host_end" || refuse "a network interface '$host_end' exists that this cluster did not create"
        else
            recorded "link $host_end" || record "link $host_end"
            # the namespace's end is created inside it directly, named alit0 there
            ip link add "$host_end" type veth peer name alit0 netns "$n"
            ip link set "$host_end" master "$BRIDGE"
            ip link set "$host_end" up
            ip -n "$n" addr add "$NET.$i/24" dev alit0
            ip -n "$n" link set alit0 up
            ip -n "$n" link set lo up
        fi
    done
    # the nodes' /etc/hosts (bind-mounted in their mount namespaces only): MASTER_ADDR=alitn1 resolves
    {
        echo "127.0.0.1 localhost"
        echo "::1 localhost ip6-localhost ip6-loopback"
        i=0
        for n in "${NODE_NAMES[@]}"; do
            i=$((i + 1))
            echo "$NET.$i $n"
        done
        echo "$CTLD_ADDR alitctl"
    } >"$DIR/etc/hosts"
    chmod 644 "$DIR/etc/hosts"
    log "network: bridge $BRIDGE ($CTLD_ADDR/24), nodes ${NODE_NAMES[*]} at $NET.1-$i"
}

teardown_net() { # delete what run/net records (namespaces first: their veth ends go with them)
    [[ -f $NET_RECORD ]] || return 0
    local kind name pids
    while read -r kind name; do
        [[ $kind == netns ]] || continue
        netns_exists "$name" || continue
        # whatever still runs in our namespace is ours (a job process that outlived its slurmstepd)
        pids=$(ip netns pids "$name" 2>/dev/null | tr '\n' ' ')
        if [[ -n ${pids// /} ]]; then
            log "killing leftover processes in namespace $name: $pids"
            kill -KILL $pids 2>/dev/null || true
        fi
        ip netns del "$name" 2>/dev/null || log "could not delete the network namespace $name"
    done <"$NET_RECORD"
    while read -r kind name; do
        [[ $kind == link ]] || continue
        if link_exists "$name"; then ip link del "$name" 2>/dev/null || log "could not delete interface $name"; fi
    done <"$NET_RECORD"
    rm -f "$NET_RECORD"
    log "network removed"
}

# ============================================================================ slurmd
spawn_slurmd() { # node
    local n=$1 logfile
    logfile=$(slurmd_logfile "$n")
    if two_nodes; then
        # own network namespace (nsenter: unlike `ip netns exec` it keeps /sys and so /sys/fs/cgroup, which
        # slurmd needs), then own UTS (hostname = node name) and mount namespace
        # (the nodes' hosts file over /etc/hosts, seen by this slurmd and its jobs only)
        spawn "$DIR/log/slurmd-$n.stdio" nsenter --net="/run/netns/$n" unshare --uts --mount --propagation private \
            sh -c 'mount --bind "$0" /etc/hosts && hostname "$1" && exec slurmd -f "$2" -N "$1"' \
            "$DIR/etc/hosts" "$n" "$CONF" || {
            tail_log "$logfile"
            tail_log "$DIR/log/slurmd-$n.stdio"
            die "slurmd of node $n failed to start"
        }
    else
        port_free "$SLURMD_PORT" slurmd
        spawn "$DIR/log/slurmd.stdio" slurmd -f "$CONF" -N "$n" || {
            tail_log "$logfile"
            die "slurmd failed to start"
        }
    fi
}

start_slurmd() {
    local n
    for n in "${NODE_NAMES[@]}"; do
        if ! running "$(slurmd_pidfile "$n")" slurmd; then spawn_slurmd "$n"; fi
    done
    local end=$((SECONDS + TIMEOUT)) state
    for n in "${NODE_NAMES[@]}"; do
        while :; do
            state=$(sinfo -h -N -n "$n" -o %T 2>/dev/null || true)
            case $state in
            idle | mixed | allocated | completing) break ;;
            *drain* | down*) # left over from an earlier run: put the node back into service
                scontrol update nodename="$n" state=resume >/dev/null 2>&1 || true ;;
            esac
            ((SECONDS < end)) || {
                tail_log "$(slurmd_logfile "$n")"
                die "node $n is '$state', not idle"
            }
            sleep 0.2
        done
        log "slurmd up (pid $(pid_of "$(slurmd_pidfile "$n")")), node $n is $state"
    done
}

all_running() {
    running "$DIR/munge/munged.pid" munged || return 1
    if accounting; then
        running "$DIR/mysql/mysqld.pid" mariadbd || return 1
        running "$DIR/run/slurmdbd.pid" slurmdbd || return 1
    fi
    running "$DIR/run/slurmctld.pid" slurmctld || return 1
    local n
    for n in "${NODE_NAMES[@]}"; do running "$(slurmd_pidfile "$n")" slurmd || return 1; done
}

lock() { # one start/stop at a time (fd 9; the daemons never inherit it, see close_fds); $DIR is checked
    exec 9>"$DIR/.lock"
    flock -w "$TIMEOUT" 9 || die "another start/stop holds $DIR/.lock"
}

start() {
    need_root start
    local b bins="slurmctld slurmd munged sbatch"
    accounting && bins+=" slurmdbd mariadbd mariadb-install-db"
    for b in $bins; do
        command -v "$b" >/dev/null || die "$b is missing: run '$0 install' first (or set ALIT_SLURM_ACCOUNTING=0)"
    done
    # slurmd's step sockets live in the spool dir, and a unix socket path has at most 107 chars
    # (a batch step's socket is <spool>/localhost_<8-digit job id>.4294967291).
    local probe="$DIR/spool/slurmd/${NODE}_12345678.4294967291"
    ((${#probe} <= 107)) || die "ALIT_SLURM_DIR '$DIR' is too long for unix socket paths: keep it under ~55 chars"
    if two_nodes; then
        command -v ip >/dev/null || die "two nodes need iproute2's 'ip' (apt-get install iproute2)"
        command -v unshare >/dev/null && command -v nsenter >/dev/null || die "two nodes need util-linux's 'unshare' and 'nsenter'"
    fi
    claim_dir
    lock
    if all_running; then
        log "already running"
        cat "$DIR/env.sh"
        return 0
    fi
    # A cold start. Whatever an earlier run left goes first: daemons of a half-started cluster, and
    # the saved state of a killed one (its "running" jobs would keep the node allocated).
    local t0=$SECONDS
    stop_all
    if [[ $KEEP_STATE != 1 ]]; then rm -rf "${DIR:?}"/{state,spool,log,run}; fi
    write_configs
    if two_nodes; then setup_net; fi
    start_munged
    if accounting; then
        start_mariadb
        start_slurmdbd
    fi
    start_slurmctld
    start_slurmd
    if [[ $SMOKE == 1 ]]; then
        timeout "$TIMEOUT" srun -N"$NODES" -n"$NODES" -t 1 -J smoke true || die "the smoke job 'srun true' failed"
    fi
    log "cluster ready in $((SECONDS - t0)) s; SLURM_CONF=$CONF"
    cat "$DIR/env.sh"
}

# ============================================================================ stop
# Job processes of this cluster. slurmstepd overwrites its environment (its process title), so the
# marker is gone; it keeps our slurmd log (slurmd.log, or slurmd-<node>.log) open, which identifies it.
is_our_stepd() { # pid
    local pid=$1 f
    [[ -n $pid && -d /proc/$pid ]] || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == slurmstepd ]] || return 1
    [[ $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) != Z ]] || return 1
    for f in /proc/"$pid"/fd/*; do
        case $(readlink "$f" 2>/dev/null) in "$DIR/log/slurmd.log" | "$DIR"/log/slurmd-*.log) return 0 ;; esac
    done
    return 1
}
our_stepds() {
    local p
    for p in /proc/[0-9]*; do
        p=${p#/proc/}
        if is_our_stepd "$p"; then echo "$p"; fi
    done
    return 0
}
# Job processes that outlived their slurmstepd: they hold our SLURM_CONF and a SLURM_JOB_ID
# (never this script or its callers, which may hold both when run from inside a job).
stray_job_procs() {
    local p ancestors=" " a=$$
    while [[ -n $a && $a != 0 && $a != 1 ]]; do
        ancestors+="$a "
        a=$(awk '{print $4}' "/proc/$a/stat" 2>/dev/null || true)
    done
    for p in /proc/[0-9]*; do
        p=${p#/proc/}
        [[ $ancestors == *" $p "* ]] && continue
        env_has "$p" "SLURM_CONF=$(regex_quote "$CONF")" || continue
        env_has "$p" "SLURM_JOB_ID=[0-9]+" || continue
        echo "$p"
    done
    return 0
}
stop_stepds() { # pids...: SIGTERM, up to 2 s, SIGKILL to the survivors
    local pid i left
    (($#)) || return 0
    log "stopping leftover slurmstepd: $*"
    kill -TERM "$@" 2>/dev/null || true
    for ((i = 0; i < 20; i++)); do
        left=""
        for pid; do if is_our_stepd "$pid"; then left+="$pid "; fi; done
        [[ -z $left ]] && return 0
        sleep 0.1
    done
    kill -KILL $left 2>/dev/null || true
}

stop_all() {
    if running "$DIR/run/slurmctld.pid" slurmctld; then
        local jobs end
        jobs=$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ' || true)
        if [[ -n ${jobs// /} ]]; then
            log "cancelling jobs: $jobs"
            scancel $jobs 2>/dev/null || true
            end=$((SECONDS + 20))
            while [[ -n $(squeue -h -o %A 2>/dev/null) ]] && ((SECONDS < end)); do sleep 0.2; done
        fi
    fi
    local n
    for n in "${NODE_NAMES[@]}"; do stop_pid "$(pid_of "$(slurmd_pidfile "$n")")" slurmd; done
    # shellcheck disable=SC2046
    stop_stepds $(our_stepds)
    local strays
    strays=$(stray_job_procs | tr '\n' ' ')
    if [[ -n ${strays// /} ]]; then
        log "killing stray job processes: $strays"
        kill -KILL $strays 2>/dev/null || true
    fi
    stop_pid "$(pid_of "$DIR/run/slurmctld.pid")" slurmctld
    stop_pid "$(pid_of "$DIR/run/slurmdbd.pid")" slurmdbd
    stop_pid "$(pid_of "$DIR/mysql/mysqld.pid")" mariadbd
    stop_pid "$(pid_of "$DIR/munge/munged.pid")" munged
    teardown_net
    log "stopped"
}

stop() {
    if [[ ! -e $DIR && ! -L $DIR ]]; then
        log "nothing to stop ($DIR does not exist)"
        return 0
    fi
    check_dir
    lock
    stop_all
}

purge() { # stop, then delete the directory -- only one this script created (check_dir refuses others)
    if [[ ! -e $DIR && ! -L $DIR ]]; then
        log "nothing to remove ($DIR does not exist)"
        return 0
    fi
    check_dir
    lock
    stop_all
    rm -rf "${DIR:?}"
    log "removed $DIR"
}

# ============================================================================ status
status() {
    local rc=0 entry n entries=("munge/munged.pid munged" "mysql/mysqld.pid mariadbd" "run/slurmdbd.pid slurmdbd"
        "run/slurmctld.pid slurmctld")
    if [[ -e $DIR || -L $DIR ]]; then check_dir; fi
    for n in "${NODE_NAMES[@]}"; do
        n=$(slurmd_pidfile "$n")
        entries+=("${n#"$DIR"/} slurmd")
    done
    for entry in "${entries[@]}"; do
        set -- $entry
        if running "$DIR/$1" "$2"; then
            echo "$2: running (pid $(pid_of "$DIR/$1"))"
        else
            echo "$2: not running"
            case $2 in mariadbd | slurmdbd) if accounting; then rc=1; fi ;; *) rc=1 ;; esac
        fi
    done
    if ((rc == 0)); then
        sinfo
        squeue
    fi
    return $rc
}

print_env() {
    if [[ -e $DIR || -L $DIR ]]; then check_dir; fi
    [[ -s $DIR/env.sh ]] || die "no cluster configured in $DIR: run '$0 start'"
    cat "$DIR/env.sh"
}

usage() { # the header comment
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2
    exit 2
}

case ${1:-} in
install) install ;;
start) start ;;
stop) stop ;;
status) status ;;
env) print_env ;;
purge) purge ;;
*) usage ;;
esac
