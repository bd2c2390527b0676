#!/usr/bin/env bash
# A lab of network namespaces on this host, for running the nodes and clients as if on separate
# machines: N namespaces joined by a bridge, each with its own address in a private test range.
#
#   scripts/netns-lab.sh up N [PREFIX] [NET]   make PREFIX1..PREFIXN on NET.0/24
#   scripts/netns-lab.sh down [PREFIX]         remove them and the bridge
#
# PREFIX defaults to "eplab" (at most 9 characters: interface names are short), NET to
# "10.203.0". The bridge PREFIXbr (in this namespace) is NET.1, so this host reaches every
# namespace; namespace i is NET.(10+i), its interface eth0, the host side of its link PREFIXvI
# (`ip link set PREFIXvI down` cuts namespace i off: a partition by the network itself).
# Needs root (CAP_NET_ADMIN). Traffic stays on this host: the bridge has no other port.
set -euo pipefail
cmd=${1:-}
case "$cmd" in
  up)
    n=${2:?usage: netns-lab.sh up N [PREFIX] [NET]}
    prefix=${3:-eplab}
    net=${4:-10.203.0}
    br="${prefix}br"
    ip link add "$br" type bridge
    ip addr add "$net.1/24" dev "$br"
    ip link set "$br" up
    for i in $(seq 1 "$n"); do
      ns="$prefix$i"
      ip netns add "$ns"
      ip link add "${prefix}v$i" type veth peer name eth0 netns "$ns"
      ip link set "${prefix}v$i" master "$br"
      ip link set "${prefix}v$i" up
      ip -n "$ns" addr add "$net.$((10 + i))/24" dev eth0
      ip -n "$ns" link set eth0 up
      ip -n "$ns" link set lo up
    done
    ;;
  down)
    prefix=${2:-eplab}
    for ns in $(ip netns list | awk '{print $1}' | grep -E "^${prefix}[0-9]+$" || true); do
      ip netns del "$ns"
    done
    ip link del "${prefix}br" 2>/dev/null || true
    ;;
  *)
    echo "usage: $0 up N [PREFIX] [NET] | down [PREFIX]" >&2
    exit 2
    ;;
esac
