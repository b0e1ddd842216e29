#!/usr/bin/env python3
"""Functions longer than 80 lines in the given Rust files (a brace matcher that skips
strings and comments): `python3 scripts/long_fns.py $(git ls-files "*.rs")`."""
import sys,re,glob
def strip(src):
    # remove comments, strings, chars -> keep newlines
    out=[];i=0;n=len(src)
    while i<n:
        c=src[i]
        if src.startswith('//',i):
            j=src.find('\n',i); j=n if j<0 else j; i=j; continue
        if src.startswith('/*',i):
            j=src.find('*/',i)+2; out.append('\n'*src[i:j].count('\n')); i=j; continue
        m=re.match(r'b?r(#*)"',src[i:i+10])
        if m:
            hashes=m.group(1); end='"'+hashes; j=src.find(end,i+len(m.group(0)))+len(end)
            out.append('""'+'\n'*src[i:j].count('\n')); i=j; continue
        if c=='"' or (c=='b' and i+1<n and src[i+1]=='"'):
            j=i+(2 if c=='b' else 1)
            while src[j]!='"':
                j+= 2 if src[j]=='\\' else 1
            j+=1; out.append('""'+'\n'*src[i:j].count('\n')); i=j; continue
        if c=="'":
            m=re.match(r"'(\\.|[^\\'])'|'\\u\{[0-9a-fA-F]+\}'|b'(\\.|[^\\'])'",src[i:i+12])
            if m: out.append("' '"); i+=len(m.group(0)); continue
        out.append(c); i+=1
    return ''.join(out)
res=[]
for f in sys.argv[1:]:
    s=strip(open(f).read())
    for m in re.finditer(r'\bfn\s+(\w+)',s):
        i=s.find('{',m.end()); semi=s.find(';',m.end())
        if i<0 or (0<=semi<i): continue
        d=0;j=i
        while j<len(s):
            if s[j]=='{': d+=1
            elif s[j]=='}':
                d-=1
                if d==0: break
            j+=1
        start=s.count('\n',0,m.start())+1; end=s.count('\n',0,j)+1
        if end-start+1>80: res.append((end-start+1,f,start,m.group(1)))
for r in sorted(res,reverse=True): print(*r)
