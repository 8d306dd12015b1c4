# Shared by the GPU benchmark scripts: `one NAME LIMIT [ENV=..] CMD ARGS...` runs one benchmark process under a
# time limit, writing $OUT/NAME.md (its --out) and $OUT/NAME.log, appends its exit code and seconds to
# $OUT/summary.txt and prints the table's rows.
one() {
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout --kill-after=15 "$limit" env "$@" --out "$OUT/$name.md" > "$OUT/$name.log" 2>&1
  echo "=== $name rc=$? $((SECONDS - t0))s" | tee -a "$OUT/summary.txt"
  grep -E "^\| " "$OUT/$name.md" 2>/dev/null | cut -c1-"${CUT:-260}"
}
