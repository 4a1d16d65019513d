#!/bin/busybox sh
# shoal disk test guest: /init of its initramfs (docs/GUESTS.md).
#
# Writes every 4 KiB block of the first N blocks of the first virtio disk, round after
# round, each block stamped with (round, block, offset) on every 64-byte line. Before a
# block is overwritten it is read back with O_DIRECT and must still hold the previous
# round's stamp: a lost, torn, misdirected or stale write shows up as an ERROR line.
# After a restart the region must be a prefix at round R and the rest at R-1 (a round
# cut short); the guest checks that and carries on where it stopped.
#
# Serial lines (the host's checker, shoal/vm/guests/check.py, parses them):
#   shoal-disk start blocks=<N>
#   shoal-disk resume round=<R> block=<P> ok=<V> errors=<E>
#   shoal-disk round=<R> ok=<V> errors=<E>
#   shoal-disk ERROR block=<B> expected=<stamp> got=<stamp>
#   shoal-disk FATAL <sentence>

/bin/busybox --install -s /bin
export PATH=/bin

BS=4096
CHUNK=32        # blocks read, checked and rewritten together: at most this many in flight
MAXERR=16       # ERROR lines per round; errors= still counts them all

fatal() {
    echo "shoal-disk FATAL $*"
    # Stay up so the host can read the console and decide.
    while :; do sleep 3600; done
}

mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
echo 1 >/proc/sys/kernel/printk
for m in $(cat /etc/shoal-modules); do
    insmod "/lib/modules/$m.ko" || fatal "cannot load the kernel module $m"
done

blocks=256
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        shoal.blocks=*) blocks="${arg#shoal.blocks=}" ;;
    esac
done
case "$blocks" in
    '' | *[!0-9]*) fatal "shoal.blocks=$blocks is not a number of blocks" ;;
esac
[ "$blocks" -gt 0 ] || fatal "shoal.blocks must be at least 1"

disk=
tries=0
while :; do
    for d in /sys/block/vd*; do
        [ -e "$d" ] && disk="/dev/${d##*/}" && break
    done
    [ -n "$disk" ] && [ -b "$disk" ] && break
    disk=
    tries=$((tries + 1))
    [ "$tries" -lt 100 ] || fatal "no virtio disk appeared (is there a -drive ...,if=virtio?)"
    usleep 100000
done
sectors=$(cat "/sys/block/${disk#/dev/}/size")
[ "$sectors" -ge $((blocks * 8)) ] \
    || fatal "$disk has $((sectors / 8)) blocks of 4 KiB, fewer than shoal.blocks=$blocks"

# The stamp of (round, block) fills the block with 64 lines of 64 bytes:
#   "shoal-disk round=%010d block=%010d off=%04d", spaces to 63 bytes, "\n".
# GEN writes blocks [first, first+n) of a round.
GEN='BEGIN {
    for (b = first; b < first + n; b++) {
        blk = ""
        for (off = 0; off < 4096; off += 64)
            blk = blk sprintf("%-63s\n", sprintf("shoal-disk round=%010d block=%010d off=%04d", round, b, off))
        printf "%s", blk
    }
}'

# CHECK reads blocks [first, first+n) as 64-byte records (bytes outside [a-z0-9= -]
# turned to "?" by tr, cut by fold) and names each block's content:
#   r<R>        every line the stamp of this block at round R
#   r<R>@b<X>   stamps of block X: a misdirected write
#   blank       all zero bytes (also what a never-written block reads as)
#   torn        stamps of this block from different rounds
#   garbage     anything else; unreadable: the read came back short
# mode=verify: every block must be at round want (want=0: no stamp at all); prints an
#   ERROR line per mismatch (at most budget) and "<ok> <errors>".
# mode=scan: finds R, the highest round stamped anywhere, and P, one past the last block
#   at R, then checks blocks [0, P) are at R; prints "<R> <P> <ok> <errors>" ("0 0 0 0"
#   when nothing is stamped). The blocks from P on are the next round's to check.
CHECK='
# Numbers are compared as text: busybox awk reads "0064" as octal.
function name_of(line, b, off,    f) {
    if (line == blank) return "blank"
    if (line !~ /^shoal-disk round=[0-9]+ block=[0-9]+ off=[0-9]+ +\?$/) return "garbage"
    split(line, f, /[ =]+/)
    if (f[7] != sprintf("%04d", off)) return "garbage"
    if (f[5] != sprintf("%010d", b)) return "r" decimal(f[3]) "@b" decimal(f[5])
    return "r" decimal(f[3])
}
function decimal(digits) { sub(/^0+/, "", digits); return digits == "" ? "0" : digits }
function is_round(s) { return s ~ /^r[0-9]+$/ }
function expect(r) { return r > 0 ? "r" r : "blank" }
function matches(s, r) { return r > 0 ? s == "r" r : (s == "blank" || s == "garbage") }
function report(b, want_r,    got) {
    got = (b in state) ? state[b] : "unreadable"
    if (matches(got, want_r)) { ok++; return }
    errors++
    if (printed < budget) {
        print "shoal-disk ERROR block=" b " expected=" expect(want_r) " got=" got > "/dev/console"
        printed++
    }
}
BEGIN { blank = sprintf("%64s", ""); gsub(/ /, "?", blank); ok = 0; errors = 0; printed = 0 }
{
    i = NR - 1; b = first + int(i / 64); off = (i % 64) * 64
    # Fast path: the line verify expects. The full naming is only for what differs.
    if (want > 0 && $0 == sprintf("%-63s?", sprintf("shoal-disk round=%010d block=%010d off=%04d", want, b, off))) t = "r" want
    else t = name_of($0, b, off)
    if (i % 64 == 0) cur = t
    else if (cur != t) cur = (is_round(cur) || cur == "torn") && is_round(t) ? "torn" : "garbage"
    if (i % 64 == 63) state[b] = cur
}
END {
    if (mode == "verify") {
        for (b = first; b < first + n; b++) report(b, want)
        print ok, errors
        exit
    }
    top = 0
    for (b = first; b < first + n; b++)
        if ((b in state) && is_round(state[b]) && substr(state[b], 2) + 0 > top) top = substr(state[b], 2) + 0
    if (NR != n * 64) { print "short read"; exit }
    if (top == 0) { print 0, 0, 0, 0; exit }
    p = 0
    for (b = first; b < first + n; b++) if (state[b] == "r" top) p = b + 1
    if (p < first + n) for (b = first; b < p; b++) report(b, top)
    print top, p, ok, errors
}'

# Blocks [first, first+n) through CHECK, read with O_DIRECT so the guest's page cache
# cannot answer for the disk.
check() {  # mode first n want budget
    dd if="$disk" bs=$BS skip="$2" count="$3" iflag=direct 2>/dev/null \
        | tr -c 'a-z0-9= -' '?' | fold -w 64 \
        | awk -v mode="$1" -v first="$2" -v n="$3" -v want="$4" -v budget="$5" "$CHECK"
}

# Blocks [first, first+n) of a round, written with O_DIRECT and flushed before dd exits.
stamp() {  # round first n
    awk -v round="$1" -v first="$2" -v n="$3" "$GEN" \
        | dd of="$disk" bs=$BS seek="$2" count="$3" iflag=fullblock oflag=direct conv=notrunc,fsync 2>/dev/null
}

echo "shoal-disk start blocks=$blocks"

set -- $(check scan 0 "$blocks" 0 "$MAXERR")
[ $# -eq 4 ] || fatal "could not read $disk"
round=$1 next=$2
if [ "$round" -eq 0 ]; then
    round=1 next=0          # nothing stamped yet: a new disk
else
    echo "shoal-disk resume round=$round block=$next ok=$3 errors=$4"
    if [ "$next" -ge "$blocks" ]; then
        round=$((round + 1)) next=0
    fi
fi

while :; do
    ok=0 errors=0 b=$next
    while [ "$b" -lt "$blocks" ]; do
        n=$((blocks - b))
        [ "$n" -le "$CHUNK" ] || n=$CHUNK
        budget=$((MAXERR - errors))
        [ "$budget" -ge 0 ] || budget=0
        set -- $(check verify "$b" "$n" $((round - 1)) "$budget")
        [ $# -eq 2 ] || fatal "could not read blocks $b-$((b + n - 1)) of $disk"
        ok=$((ok + $1)) errors=$((errors + $2))
        stamp "$round" "$b" "$n" || fatal "could not write blocks $b-$((b + n - 1)) of $disk"
        b=$((b + n))
    done
    echo "shoal-disk round=$round ok=$ok errors=$errors"
    round=$((round + 1)) next=0
done
