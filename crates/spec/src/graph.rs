//! Checks across stages: unique names, references (`after`, `after_any`, `from`,
//! `results_of`), no cycles.

use crate::locate::Ctx;
use crate::{SpecError, StageSpec};
use std::collections::HashMap;
use std::ops::Range;

/// A parsed stage with the spans the cross-stage checks point at.
pub(crate) struct Located {
    pub(crate) spec: StageSpec,
    pub(crate) name_span: Range<usize>,
    /// Span of each `after` entry, parallel to `spec.after`.
    pub(crate) after_spans: Vec<Range<usize>>,
    /// Span of each `after_any` entry, parallel to `spec.after_any`.
    pub(crate) any_spans: Vec<Range<usize>>,
    /// Span of each stage name of `items.from` / `items.results_of`.
    pub(crate) from_spans: Vec<Range<usize>>,
}

/// One reference to another stage: its index, where it is written, the key.
struct Edge {
    to: usize,
    span: Range<usize>,
    key: String,
}

/// Runs every cross-stage check, in file order.
pub(crate) fn check(cx: &Ctx<'_>, stages: &[Located]) -> Result<(), SpecError> {
    let index = unique_names(cx, stages)?;
    let edges = resolve_after(cx, stages, &index)?;
    no_cycles(cx, stages, &edges)
}

/// Stage name -> index; fails on the second use of a name.
fn unique_names<'s>(
    cx: &Ctx<'_>,
    stages: &'s [Located],
) -> Result<HashMap<&'s str, usize>, SpecError> {
    let mut index: HashMap<&str, usize> = HashMap::new();
    for (i, s) in stages.iter().enumerate() {
        if let Some(&first) = index.get(s.spec.name.as_str()) {
            let line = cx.line_of(stages[first].name_span.start);
            let msg = format!(
                "stage \"{}\" is listed twice (first at line {line})",
                s.spec.name
            );
            return Err(cx.err(
                s.name_span.clone(),
                &format!("stage \"{}\".name", s.spec.name),
                msg,
            ));
        }
        index.insert(s.spec.name.as_str(), i);
    }
    Ok(index)
}

/// For each stage, the stages it names; fails on unknown or self names and on a
/// name listed twice in one key.
fn resolve_after(
    cx: &Ctx<'_>,
    stages: &[Located],
    index: &HashMap<&str, usize>,
) -> Result<Vec<Vec<Edge>>, SpecError> {
    let mut edges = Vec::with_capacity(stages.len());
    for (i, s) in stages.iter().enumerate() {
        let from: Vec<String> = match &s.spec.items {
            crate::ItemsSpec::Stream { from, .. } => from.clone(),
            _ => Vec::new(),
        };
        let lists = [
            ("after", &s.spec.after, &s.after_spans),
            ("after_any", &s.spec.after_any, &s.any_spans),
            ("items", &from, &s.from_spans),
        ];
        let mut out: Vec<Edge> = Vec::new();
        for (what, names, spans) in lists {
            let key = format!("stage \"{}\".{what}", s.spec.name);
            let first = out.len();
            for (name, span) in names.iter().zip(spans) {
                let err = |msg: String| cx.err(span.clone(), &key, msg);
                let target = *index
                    .get(name.as_str())
                    .ok_or_else(|| err(format!("unknown stage \"{name}\"")))?;
                if target == i {
                    return Err(err(format!("stage \"{name}\" cannot come after itself")));
                }
                if out[first..].iter().any(|e| e.to == target) {
                    return Err(err(format!("stage \"{name}\" is listed twice")));
                }
                if what == "after_any" && s.spec.after.contains(name) {
                    return Err(err(format!(
                        "stage \"{name}\" is in both after and after_any; keep one"
                    )));
                }
                out.push(Edge {
                    to: target,
                    span: span.clone(),
                    key: key.clone(),
                });
            }
        }
        edges.push(out);
    }
    Ok(edges)
}

#[derive(Clone, Copy, PartialEq)]
enum Mark {
    New,
    Open,
    Done,
}

/// Depth-first search from each stage in file order; a path back to an open
/// stage is a cycle, reported at the `after` entry that starts it.
fn no_cycles(cx: &Ctx<'_>, stages: &[Located], edges: &[Vec<Edge>]) -> Result<(), SpecError> {
    let mut marks = vec![Mark::New; stages.len()];
    for start in 0..stages.len() {
        let mut path = Vec::new();
        if let Some(cycle) = visit(start, edges, &mut marks, &mut path) {
            return Err(cycle_error(cx, stages, edges, &cycle));
        }
    }
    Ok(())
}

/// Visits `node`; `path` holds (stage, entry of its `after` being followed).
fn visit(
    node: usize,
    edges: &[Vec<Edge>],
    marks: &mut [Mark],
    path: &mut Vec<(usize, usize)>,
) -> Option<Vec<(usize, usize)>> {
    match marks[node] {
        Mark::Done => return None,
        Mark::Open => {
            let from = path.iter().position(|&(n, _)| n == node)?;
            return Some(path[from..].to_vec());
        }
        Mark::New => marks[node] = Mark::Open,
    }
    for (entry, edge) in edges[node].iter().enumerate() {
        path.push((node, entry));
        if let Some(cycle) = visit(edge.to, edges, marks, path) {
            return Some(cycle);
        }
        path.pop();
    }
    marks[node] = Mark::Done;
    None
}

/// "cycle in after: a -> b -> a", at the first stage's `after` entry.
fn cycle_error(
    cx: &Ctx<'_>,
    stages: &[Located],
    edges: &[Vec<Edge>],
    cycle: &[(usize, usize)],
) -> SpecError {
    let (first, entry) = cycle[0];
    let mut names: Vec<&str> = cycle
        .iter()
        .map(|&(n, _)| stages[n].spec.name.as_str())
        .collect();
    names.push(&stages[first].spec.name);
    let edge = &edges[first][entry];
    cx.err(
        edge.span.clone(),
        &edge.key,
        format!("cycle in after: {}", names.join(" -> ")),
    )
}
