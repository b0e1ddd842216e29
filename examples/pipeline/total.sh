#!/bin/sh
# The combining stage: reads "DIR<TAB>BYTES" records on stdin, acks each one on
# fd 3, and at the end of its input hands over its per-directory totals as a
# checkpoint: the fragment's result. A fragment that resumes (GRANULE_CHECKPOINT)
# starts from the totals it was handed.
state=$(mktemp)
awk -F '\t' -v OFS='\t' -v prev="${GRANULE_CHECKPOINT:-}" -v out="$state" -v cmd="$GRANULE_CMD" '
BEGIN {
    if (prev != "")
        while ((getline line < prev) > 0) { split(line, f, "\t"); total[f[1]] += f[2] }
}
{ total[$1] += $2; print $0 > "/dev/fd/3"; fflush("/dev/fd/3") }
END {
    printf "" > out
    for (d in total) print d, total[d] > out
    close(out)
    print cmd " checkpoint " out > "/dev/fd/3"
}'
