#!/bin/sh
# Compares the exported prototypes Go generated (GENERATED) with the hand-written header
# (HANDWRITTEN). Normalised so only real differences count: `const` (cgo drops it), `extern`,
# `(void)` vs `()` and spacing. Exits 1 and prints a diff when they differ.
set -eu
generated=$1
handwritten=$2
normalise() {
	sed -n 's/^\(extern \)\{0,1\}\(int\|void\|long\|size_t\|double\) \(hm_[a-z_]*(.*);\)$/\2 \3/p' "$1" |
		sed -e 's/const //g' -e 's/(void)/()/' -e 's/  */ /g' -e 's/ \*/* /g' | sort
}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
normalise "$generated" >"$tmp/generated"
normalise "$handwritten" >"$tmp/handwritten"
if [ ! -s "$tmp/generated" ]; then
	echo "check_header: no hm_* prototypes found in $generated" >&2
	exit 1
fi
if ! diff -u "$tmp/handwritten" "$tmp/generated"; then
	echo "check_header: $handwritten does not match the Go exports (diff above: - hand-written, + generated)" >&2
	exit 1
fi
echo "check_header: $(wc -l <"$tmp/generated") prototypes match"
