#!/usr/bin/env bash
# The whole demo, step by step, as a user would run it: two daemons on this machine
# (source.toml and destination.toml), one live migration with its progress, the stats,
# and proof that the destination holds the same bytes. `livemig demo` does the same on
# embedded defaults; this script shows the commands.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
livemig="${LIVEMIG:-$(command -v livemig || echo "$here/../.venv/bin/livemig")}"
src="$here/run/source.sock"
dst="$here/run/destination.sock"
mkdir -p "$here/run"
# A fresh demo: forget which host owned the devices last time (the daemons keep that
# record in run/NAME.owners.json so that a restart never lifts the fence).
rm -f "$here"/run/*.owners.json

"$livemig" daemon --config "$here/source.toml" 2>"$here/run/source.log" &
source_pid=$!
"$livemig" daemon --config "$here/destination.toml" 2>"$here/run/destination.log" &
destination_pid=$!
trap 'kill -TERM $source_pid $destination_pid 2>/dev/null; wait' EXIT

# A daemon creates its control socket last, once it is ready.
for _ in $(seq 100); do
    [[ -S $src && -S $dst ]] && break
    kill -0 $source_pid $destination_pid || { cat "$here"/run/*.log; exit 1; }
    sleep 0.1
done

echo "== devices on the source"
"$livemig" devices --control "$src"
echo "== arming the destination: it takes one migration, from the daemon named source"
"$livemig" incoming --control "$dst" --devices nic0,gpu0,ram0 --from source
echo "== migrating to 127.0.0.1:7072"
"$livemig" migrate --control "$src" --to 127.0.0.1:7072 --downtime-limit-ms 50
echo "== devices afterwards: stopped here, running there"
"$livemig" devices --control "$src"
"$livemig" devices --control "$dst"
echo "== digests (equal: the migration was byte-exact)"
if diff <("$livemig" digests --control "$src") <("$livemig" digests --control "$dst"); then
    echo "equal"
else
    echo "DIFFERENT" && exit 1
fi
