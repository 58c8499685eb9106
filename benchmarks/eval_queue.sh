#!/usr/bin/env bash
# Runs the hf-longctx eval commands of a queue file one after another, each line once (done lines
# are recorded beside it), so that lines can be appended while it runs and a restart goes on where
# it stopped (every command also resumes its own finished cells from --out/cells.json).
#   benchmarks/eval_queue.sh QUEUE_FILE LOG_FILE
set -u
queue=$1; log=$2; done_file="$queue.done"
touch "$done_file"
while true; do
  line=$(grep -vxF -f "$done_file" "$queue" | grep -v '^\s*#' | grep -v '^\s*$' | head -1)
  [ -z "$line" ] && { echo "$(date -u +%FT%TZ) queue empty" >> "$log"; break; }
  echo "$(date -u +%FT%TZ) start: $line" >> "$log"
  start=$(date +%s)
  bash -c "$line" >> "$log" 2>&1
  echo "$(date -u +%FT%TZ) exit $? after $(( $(date +%s) - start )) s: $line" >> "$log"
  echo "$line" >> "$done_file"
done
