#!/usr/bin/env bash
# Summarize every document of a folder into one JSONL file with `dynkv batch`.
#
#   examples/batch.sh [FOLDER] [OUT.jsonl]      (defaults: examples/docs, results.jsonl)
#
# The model is the one dynkv picks itself: $DYNKV_MODEL, else the config file, else the default
# model. Run it again after a crash or Ctrl-C: documents already in OUT are skipped, so nothing is
# done twice. Exit code: 0 all done, 1 some document failed (its line has an "error"), 2 usage error.
set -u

here="$(cd "$(dirname "$0")" && pwd)"
folder="${1:-$here/docs}"
out="${2:-results.jsonl}"

dynkv batch "$folder" --task summarize --out "$out" --budget 10% --max-new-tokens 64
status=$?

case "$status" in
  0) echo "all documents summarized: $out" ;;
  1) echo "some documents failed; their lines in $out have an \"error\":" >&2
     grep '"error": "' "$out" >&2 ;;
  2) echo "usage error: see the message above" >&2 ;;
  *) echo "dynkv batch stopped (exit code $status); run this script again to resume" >&2 ;;
esac
exit "$status"
