#!/usr/bin/env python3
"""Lines of Rust in a file, not counting blank lines, comments, SQL (string) text or
the tests module: `python3 scripts/rust_lines.py crates/store/src/sqlite.rs crates/store/src/pg.rs`."""
import sys,re
def count(path):
    src=open(path).read()
    # cut test module
    i=src.find('#[cfg(test)]\nmod tests')
    if i>=0: src=src[:i]
    n=0; in_raw=False; in_str=False
    for line in src.split('\n'):
        s=line.strip()
        if in_raw:
            if '"#' in s: in_raw=False
            continue
        if in_str:
            # continuation of multi-line normal string
            if re.search(r'(?<!\\)"', s): in_str=False
            continue
        if not s or s.startswith('//'): continue
        if 'r#"' in s and '"#' not in s.split('r#"',1)[1]:
            in_raw=True
            # count line if it has code before
            if s.split('r#"')[0].strip() not in ('',): n+=1
            continue
        # multi-line plain string opening: odd number of unescaped quotes
        q=len(re.findall(r'(?<!\\)"', s))
        if q%2==1:
            in_str=True
            if not s.startswith('"'): n+=1
            continue
        if s.startswith('"'): continue
        n+=1
    return n
for p in sys.argv[1:]: print(count(p), p)
