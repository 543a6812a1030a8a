#!/usr/bin/env bash
# An emulated multi-host cluster on one Linux machine (root only): N "hosts" are network namespaces,
# each with one veth link into a bridge in the root namespace, shaped with tc (token bucket) at BW in
# both directions, and each running its own sshd with a key made for this cluster, so that
#
#   deepspeed --hostfile run/cluster.hostfile --module ds_ext.train --recipe recipes/quickstart.yaml
#
# launches through pdsh + ssh exactly as on a real cluster (export the line `run/cluster.sh env` prints
# first: it points DeepSpeed's DS_ENV_FILE at a file that sets GLOO_SOCKET_IFNAME=eth0 on every host).
#
#   run/cluster.sh up N BW [--id K] [--slots S] [--mtu M]   N hosts, BW per host link (tc rate: 1gbit,
#                                                          10gbit, 500mbit, or 'unlimited')
#   run/cluster.sh shape BW [--id K]        change the link rate of a running cluster
#   run/cluster.sh status [--id K]          hosts, addresses, qdiscs, sshd pids
#   run/cluster.sh env [--id K]             the export line for DeepSpeed (DS_ENV_FILE)
#   run/cluster.sh exec I [--id K] -- CMD   run CMD inside host I (1-based), e.g. the documented
#                                          fallback without ssh: deepspeed ... --no_ssh --node_rank I-1
#   run/cluster.sh down [--id K]            remove everything `up` made (also after a failed up or run)
#
# What `up` makes (K = cluster id, default 0; several ids can be up at once):
#   * bridge dsxK-br with 10.213.K.1/24 (so the launcher in the root namespace reaches every host);
#   * namespaces dsxK-h1..N; host i has eth0 = 10.213.K.(10+i)/24 (the peer of root-side veth dsxK-vi);
#     10.213.0.0/16 is a private range used only inside these namespaces;
#   * tc tbf (rate BW, burst max(256 KB, 2 ms at BW), latency 100 ms) on eth0 inside the host (upload)
#     and on dsxK-vi (download). netem does not exist in this machine's kernel: no latency or loss is
#     emulated, only bandwidth;
#   * one sshd per host (ip netns exec ... /usr/sbin/sshd -f run/.cluster/K/hI.sshd_config), listening
#     on the host's address only, root login with the cluster key only;
#   * run/.cluster/K/ (git-ignored): keys, sshd configs, pid files, logs, known_hosts, hostfile,
#     deepspeed_env; run/cluster.hostfile is a copy of the hostfile for K = 0;
#   * a marked block "Host 10.213.K.*" at the top of root's ~/.ssh/config naming the cluster key and
#     known_hosts (ssh and pdsh read only that file), removed again by `down`.
# `up` removes whatever it made if any step fails. `down` finds the namespaces, links and processes by
# name (not only from the state directory), so it also cleans up after a crash; processes inside the
# namespaces (sshd and anything launched through it) are ended by pid.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PROG="run/cluster.sh"
die() { echo "$PROG: $*" >&2; exit 2; }
note() { echo "[cluster] $*" >&2; }

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//' >&2; exit 2; }

cmd="${1:-}"; [ -n "$cmd" ] || usage; shift
ID=0; SLOTS=1; MTU=1500; POS=(); EXEC=()
while [ $# -gt 0 ]; do
  case "$1" in
    --id) ID="${2:?--id needs a value}"; shift 2 ;;
    --slots) SLOTS="${2:?--slots needs a value}"; shift 2 ;;
    --mtu) MTU="${2:?--mtu needs a value}"; shift 2 ;;
    --) shift; EXEC=("$@"); break ;;
    -h|--help) usage ;;
    *) POS+=("$1"); shift ;;
  esac
done
[[ "$ID" =~ ^[0-9]+$ ]] && [ "$ID" -le 255 ] || die "--id $ID: an integer 0..255 (it is the third byte of 10.213.K.0/24)"
[[ "$SLOTS" =~ ^[1-9][0-9]*$ ]] || die "--slots $SLOTS: a positive integer"
[[ "$MTU" =~ ^[0-9]+$ ]] && [ "$MTU" -ge 576 ] && [ "$MTU" -le 65535 ] || die "--mtu $MTU: an integer 576..65535"

P="dsx${ID}"                      # name prefix of everything this cluster makes
BR="${P}-br"
NET="10.213.${ID}"
RT="$ROOT/run/.cluster/$ID"       # runtime directory (git-ignored)
SSHCFG="$(getent passwd "$(id -un)" | cut -d: -f6)/.ssh/config"   # ssh reads the passwd home, not $HOME
MARK_BEGIN="# >>> ds_ext cluster $ID (run/cluster.sh; removed by: run/cluster.sh down --id $ID) >>>"
MARK_END="# <<< ds_ext cluster $ID <<<"

host_ns() { echo "${P}-h$1"; }
host_ip() { echo "${NET}.$((10 + $1))"; }
our_namespaces() { ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^${P}-h[0-9]+$" || true; }

need_root() {
  [ "$(id -u)" = "0" ] || die "'$cmd' needs root (network namespaces, veth links, tc and per-host sshd): run it as root, e.g. sudo bash $PROG $cmd ${POS[*]:-}"
}

need_tools() {
  local missing=() t
  for t in ip tc ssh ssh-keygen pdsh; do command -v "$t" >/dev/null 2>&1 || missing+=("$t"); done
  [ -x /usr/sbin/sshd ] || missing+=("/usr/sbin/sshd")
  if [ "${#missing[@]}" -gt 0 ]; then
    die "missing: ${missing[*]} (Debian packages openssh-server pdsh iproute2): run 'bash run/setup.sh' as root, or apt-get install -y openssh-server pdsh iproute2"
  fi
}

# tc rate -> bits per second (for the burst size); 'unlimited' -> 0
rate_bps() {
  local r="${1,,}" num unit
  [ "$r" = "unlimited" ] && { echo 0; return; }
  [[ "$r" =~ ^([0-9]+(\.[0-9]+)?)(bit|kbit|mbit|gbit|tbit)$ ]] || die "bandwidth '$1': use a tc rate such as 100mbit, 1gbit, 10gbit, or 'unlimited'"
  num="${BASH_REMATCH[1]}"; unit="${BASH_REMATCH[3]}"
  awk -v n="$num" -v u="$unit" 'BEGIN { m = (u=="bit")?1:(u=="kbit")?1e3:(u=="mbit")?1e6:(u=="gbit")?1e9:1e12; printf "%.0f\n", n*m }'
}

shape_dev() {  # shape_dev NETNS|- DEV BW
  local ns="$1" dev="$2" bw="$3" bps burst run=()
  [ "$ns" != "-" ] && run=(ip netns exec "$ns")
  bps="$(rate_bps "$bw")"
  if [ "$bps" = "0" ]; then
    "${run[@]}" tc qdisc del dev "$dev" root 2>/dev/null || true
    return
  fi
  burst=$(( bps / 8 / 500 ))            # 2 ms at the line rate
  [ "$burst" -lt 262144 ] && burst=262144
  "${run[@]}" tc qdisc replace dev "$dev" root tbf rate "$bw" burst "$burst" latency 100ms
}

ssh_block_remove() {
  [ -f "$SSHCFG" ] || return 0
  if grep -qF "$MARK_BEGIN" "$SSHCFG"; then
    local tmp; tmp="$(mktemp)"
    awk -v b="$MARK_BEGIN" -v e="$MARK_END" '$0==b {skip=1; next} skip && $0==e {skip=0; next} !skip' "$SSHCFG" > "$tmp"
    cat "$tmp" > "$SSHCFG"; rm -f "$tmp"
    [ -s "$SSHCFG" ] || rm -f "$SSHCFG"
  fi
}

ssh_block_add() {
  mkdir -p "$(dirname "$SSHCFG")"; chmod 700 "$(dirname "$SSHCFG")"
  local tmp; tmp="$(mktemp)"
  {
    echo "$MARK_BEGIN"
    echo "Host ${NET}.*"
    echo "  IdentityFile $RT/id_ed25519"
    echo "  IdentitiesOnly yes"
    echo "  UserKnownHostsFile $RT/known_hosts"
    echo "  StrictHostKeyChecking yes"
    echo "  BatchMode yes"
    echo "  LogLevel ERROR"
    echo "Host *"
    echo "$MARK_END"
    [ -f "$SSHCFG" ] && cat "$SSHCFG"
  } > "$tmp"
  cat "$tmp" > "$SSHCFG"; rm -f "$tmp"; chmod 600 "$SSHCFG"
}

# True once process $1 has exited (a zombie waiting for init to reap it counts as exited); false
# after 5 s.
wait_gone() {
  local p="$1" i state
  for i in $(seq 500); do
    state="$(sed -e 's/.*) //' "/proc/$p/stat" 2>/dev/null | cut -d' ' -f1 || true)"
    [ -z "$state" ] || [ "$state" = "Z" ] && return 0
    sleep 0.01
  done
  return 1
}

# End every process inside our namespaces by pid (TERM, then KILL after 5 s), then remove them.
do_down() {
  local ns pids p removed=0
  for ns in $(our_namespaces); do
    pids="$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')"
    if [ -n "${pids// /}" ]; then
      kill -TERM $pids 2>/dev/null || true
      for p in $pids; do wait_gone "$p" || kill -KILL "$p" 2>/dev/null || true; done
    fi
    ip netns del "$ns" 2>/dev/null || true
    removed=$((removed + 1))
  done
  local dev
  for dev in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 | grep -E "^${P}-(v[0-9]+|br)$" || true); do
    ip link del "$dev" 2>/dev/null || true
  done
  flock_ssh ssh_block_remove
  if [ "$ID" = "0" ] && [ -f "$ROOT/run/cluster.hostfile" ]; then rm -f "$ROOT/run/cluster.hostfile"; fi
  rm -rf "$RT"
  rmdir "$ROOT/run/.cluster" 2>/dev/null || true
  note "cluster $ID is down ($removed host namespace(s) removed)"
}

flock_ssh() {  # serialise edits of ~/.ssh/config between clusters
  mkdir -p "$(dirname "$SSHCFG")"
  ( flock 9; "$@" ) 9<"$(dirname "$SSHCFG")"   # the directory itself: no lock file left behind
}

do_up() {
  [ "${#POS[@]}" -eq 2 ] || die "usage: $PROG up N BW [--id K] [--slots S] [--mtu M]   (e.g. $PROG up 4 1gbit)"
  local n="${POS[0]}" bw="${POS[1]}" i ns ip v
  [[ "$n" =~ ^[0-9]+$ ]] && [ "$n" -ge 1 ] && [ "$n" -le 200 ] || die "N=$n: the number of hosts, 1..200"
  rate_bps "$bw" >/dev/null
  need_root; need_tools
  if [ -n "$(our_namespaces)" ] || ip link show "$BR" >/dev/null 2>&1 || [ -d "$RT" ]; then
    die "cluster $ID is already up (or left over): run '$PROG down --id $ID' first, or use another --id"
  fi
  if ip -o addr show 2>/dev/null | grep -v " ${P}-" | grep -q " inet ${NET}\."; then
    die "addresses ${NET}.0/24 are already used on this machine (outside this cluster): use another --id"
  fi
  ip netns add "${P}-probe" 2>/dev/null && ip netns del "${P}-probe" \
    || die "'ip netns add' does not work here (needs root with CAP_SYS_ADMIN and network namespace support)"

  trap 'rc=$?; if [ $rc -ne 0 ]; then note "up failed (exit $rc): removing what was made"; do_down; fi' EXIT
  mkdir -p "$RT"; chmod 700 "$RT"
  echo "n=$n bw=$bw slots=$SLOTS mtu=$MTU" > "$RT/state"
  ssh-keygen -q -t ed25519 -N "" -C "ds_ext-cluster-$ID" -f "$RT/id_ed25519"
  ssh-keygen -q -t ed25519 -N "" -C "ds_ext-cluster-$ID-host" -f "$RT/ssh_host_ed25519_key"
  cp "$RT/id_ed25519.pub" "$RT/authorized_keys"; chmod 600 "$RT/authorized_keys"
  echo "${NET}.* $(cut -d' ' -f1,2 "$RT/ssh_host_ed25519_key.pub")" > "$RT/known_hosts"
  mkdir -p /run/sshd && chmod 755 /run/sshd   # sshd's privilege-separation directory (Debian)

  ip link add "$BR" type bridge
  ip link set "$BR" mtu "$MTU"
  ip addr add "${NET}.1/24" dev "$BR"
  ip link set "$BR" up
  : > "$RT/hostfile"
  for i in $(seq 1 "$n"); do
    ns="$(host_ns "$i")"; ip="$(host_ip "$i")"; v="${P}-v$i"
    ip netns add "$ns"
    ip link add "$v" mtu "$MTU" type veth peer name "${P}-p$i" mtu "$MTU"
    ip link set "${P}-p$i" netns "$ns"
    ip -n "$ns" link set "${P}-p$i" name eth0
    ip -n "$ns" addr add "$ip/24" dev eth0
    ip -n "$ns" link set lo up
    ip -n "$ns" link set eth0 up
    ip link set "$v" master "$BR"
    ip link set "$v" up
    shape_dev "$ns" eth0 "$bw"
    shape_dev - "$v" "$bw"
    cat > "$RT/h$i.sshd_config" <<EOF
# sshd of emulated host $i of ds_ext cluster $ID (made by run/cluster.sh up; removed by down)
Port 22
ListenAddress $ip
HostKey $RT/ssh_host_ed25519_key
PidFile $RT/h$i.sshd.pid
AuthorizedKeysFile $RT/authorized_keys
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
UseDNS no
X11Forwarding no
PrintMotd no
MaxStartups 256
MaxSessions 256
LogLevel ERROR
EOF
    ip netns exec "$ns" /usr/sbin/sshd -f "$RT/h$i.sshd_config" -E "$RT/h$i.sshd.log" \
      || die "sshd of host $i did not start (log: $RT/h$i.sshd.log)"
    echo "$ip slots=$SLOTS" >> "$RT/hostfile"
  done
  {
    echo "DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}"
    echo "GLOO_SOCKET_IFNAME=eth0"
    echo "OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}"
  } > "$RT/deepspeed_env"
  flock_ssh ssh_block_add
  for i in $(seq 1 "$n"); do   # the whole path: root namespace -> bridge -> host i's sshd
    ssh -o ConnectTimeout=10 "$(host_ip "$i")" true \
      || die "ssh to host $i ($(host_ip "$i")) failed (sshd log: $RT/h$i.sshd.log)"
  done
  [ "$ID" = "0" ] && cp "$RT/hostfile" "$ROOT/run/cluster.hostfile"
  trap - EXIT
  note "cluster $ID is up: $n host(s) ${NET}.11..$(host_ip "$n"), links shaped at $bw (no latency emulation: no netem in this kernel)"
  note "hostfile: $( [ "$ID" = 0 ] && echo "run/cluster.hostfile" || echo "$RT/hostfile" )"
  note "launch:   export DS_ENV_FILE=$RT/deepspeed_env"
  note "          .venv/bin/deepspeed --hostfile $( [ "$ID" = 0 ] && echo "run/cluster.hostfile" || echo "$RT/hostfile" ) --master_addr ${NET}.11 --module ds_ext.train --recipe recipes/quickstart.yaml"
  note "remove:   $PROG down$( [ "$ID" = 0 ] || echo " --id $ID")"
}

do_shape() {
  [ "${#POS[@]}" -eq 1 ] || die "usage: $PROG shape BW [--id K]"
  need_root
  local bw="${POS[0]}" ns i
  rate_bps "$bw" >/dev/null
  [ -f "$RT/state" ] || die "cluster $ID is not up"
  for ns in $(our_namespaces); do
    i="${ns##*-h}"
    shape_dev "$ns" eth0 "$bw"
    shape_dev - "${P}-v$i" "$bw"
  done
  sed -i "s/ bw=[^ ]*/ bw=$bw/" "$RT/state"
  note "cluster $ID links shaped at $bw"
}

do_status() {
  if [ ! -f "$RT/state" ] && [ -z "$(our_namespaces)" ]; then echo "cluster $ID: down"; return 0; fi
  echo "cluster $ID: $(cat "$RT/state" 2>/dev/null || echo 'no state file (left over: run down)')"
  local ns i
  for ns in $(our_namespaces); do
    i="${ns##*-h}"
    echo "  $ns $(ip -n "$ns" -o -4 addr show dev eth0 2>/dev/null | awk '{print $4}')" \
         "sshd pid $(cat "$RT/h$i.sshd.pid" 2>/dev/null || echo '-')" \
         "processes $(ip netns pids "$ns" 2>/dev/null | wc -l)" \
         "qdisc: $(ip netns exec "$ns" tc qdisc show dev eth0 2>/dev/null | head -n 1)"
  done
}

do_exec() {
  [ "${#POS[@]}" -eq 1 ] && [ "${#EXEC[@]}" -gt 0 ] || die "usage: $PROG exec I [--id K] -- CMD ARGS..."
  need_root
  local ns; ns="$(host_ns "${POS[0]}")"
  ip netns list | awk '{print $1}' | grep -qx "$ns" || die "host ${POS[0]} of cluster $ID does not exist"
  exec ip netns exec "$ns" env GLOO_SOCKET_IFNAME=eth0 "${EXEC[@]}"
}

case "$cmd" in
  up) do_up ;;
  down) need_root; do_down ;;
  shape) do_shape ;;
  status) do_status ;;
  env) [ -f "$RT/deepspeed_env" ] || die "cluster $ID is not up"; echo "export DS_ENV_FILE=$RT/deepspeed_env" ;;
  exec) do_exec ;;
  *) usage ;;
esac
