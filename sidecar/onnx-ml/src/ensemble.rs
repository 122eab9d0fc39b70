//! The compact tree layout and its evaluation. No tract here: an
//! [`Ensemble`] is built once from validated [`TreeAttrs`] and then only
//! read, so runs may share it across threads.
//!
//! Semantics follow onnxruntime's CPU kernels (the reference the project
//! is tested against), including its handling of binary classifiers with
//! one scored class and of `base_values`.

use std::collections::HashMap;

use crate::SpecError;

/// How a branch node compares the feature `x` with its threshold `t`; the
/// comparison being true sends the walk to the node's true child.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Mode {
    /// `x <= t`
    Leq = 0,
    /// `x < t`
    Lt = 1,
    /// `x >= t`
    Gte = 2,
    /// `x > t`
    Gt = 3,
    /// `x == t`
    Eq = 4,
    /// `x != t`
    Neq = 5,
    /// A leaf: carries weights, no comparison.
    Leaf = 6,
}

impl Mode {
    /// Parses an ONNX `nodes_modes` string.
    pub fn parse(s: &str) -> Option<Mode> {
        Some(match s {
            "BRANCH_LEQ" => Mode::Leq,
            "BRANCH_LT" => Mode::Lt,
            "BRANCH_GTE" => Mode::Gte,
            "BRANCH_GT" => Mode::Gt,
            "BRANCH_EQ" => Mode::Eq,
            "BRANCH_NEQ" => Mode::Neq,
            "LEAF" => Mode::Leaf,
            _ => return None,
        })
    }

    fn from_bits(b: u32) -> Mode {
        match b {
            0 => Mode::Leq,
            1 => Mode::Lt,
            2 => Mode::Gte,
            3 => Mode::Gt,
            4 => Mode::Eq,
            5 => Mode::Neq,
            _ => Mode::Leaf,
        }
    }
}

/// What is done to the aggregated scores before they are returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum PostTransform {
    #[default]
    None,
    Softmax,
    Logistic,
    SoftmaxZero,
    Probit,
}

impl PostTransform {
    pub fn parse(s: &str) -> Option<PostTransform> {
        Some(match s {
            "NONE" => PostTransform::None,
            "SOFTMAX" => PostTransform::Softmax,
            "LOGISTIC" => PostTransform::Logistic,
            "SOFTMAX_ZERO" => PostTransform::SoftmaxZero,
            "PROBIT" => PostTransform::Probit,
            _ => return None,
        })
    }
}

/// How a regressor combines its trees' leaf values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Aggregate {
    #[default]
    Sum,
    Average,
    Min,
    Max,
}

impl Aggregate {
    pub fn parse(s: &str) -> Option<Aggregate> {
        Some(match s {
            "SUM" => Aggregate::Sum,
            "AVERAGE" => Aggregate::Average,
            "MIN" => Aggregate::Min,
            "MAX" => Aggregate::Max,
            _ => return None,
        })
    }
}

/// The attributes of a tree ensemble node, already decoded from protobuf
/// but not yet checked. All `nodes_*` vectors have one entry per node and
/// all `leaf_*` vectors one entry per leaf weight.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TreeAttrs {
    pub nodes_treeids: Vec<i64>,
    pub nodes_nodeids: Vec<i64>,
    pub nodes_featureids: Vec<i64>,
    pub nodes_modes: Vec<Mode>,
    /// Thresholds. [`Threshold::F64`] thresholds (from `nodes_values_as_tensor`)
    /// are rounded to the f32 that gives the same comparisons on f32 inputs.
    pub nodes_values: Vec<Threshold>,
    pub nodes_truenodeids: Vec<i64>,
    pub nodes_falsenodeids: Vec<i64>,
    /// Empty means "all false".
    pub nodes_missing_value_tracks_true: Vec<bool>,
    pub leaf_treeids: Vec<i64>,
    pub leaf_nodeids: Vec<i64>,
    /// Class index (classifier) or target index (regressor).
    pub leaf_targetids: Vec<i64>,
    pub leaf_weights: Vec<f32>,
    /// Number of classes or targets: scores per row.
    pub n_targets: usize,
    pub base_values: Vec<f32>,
    pub post_transform: PostTransform,
    pub aggregate: Aggregate,
}

/// A branch threshold as found in the model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Threshold {
    F32(f32),
    F64(f64),
}

/// One node, 16 bytes. `meta` packs the feature index (low 24 bits), the
/// mode (bits 24..28) and the missing-value-tracks-true flag (bit 28). For a
/// leaf, `a..b` is its range in the leaf arrays; for a branch, `a` is the
/// true child and `b` the false child (absolute indices).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Node {
    meta: u32,
    threshold: f32,
    a: u32,
    b: u32,
}

const FEATURE_MASK: u32 = 0x00FF_FFFF;
/// Tree walks run interleaved, this many at a time.
const LANES: usize = 8;
const MODE_SHIFT: u32 = 24;
const MISSING_TRUE: u32 = 1 << 28;
/// Feature indices must fit in the 24 bits of `Node::meta`.
pub const MAX_FEATURES: usize = FEATURE_MASK as usize;

/// A validated, compact tree ensemble.
#[derive(Debug, Clone, PartialEq)]
pub struct Ensemble {
    nodes: Vec<Node>,
    roots: Vec<u32>,
    leaf_targets: Vec<u32>,
    leaf_weights: Vec<f32>,
    n_features: usize,
    n_targets: usize,
    /// `Some(mode)` when every branch node has this mode: the walk is then
    /// specialised to it.
    uniform_mode: Option<Mode>,
    any_missing_true: bool,
    base_values: Vec<f32>,
    post_transform: PostTransform,
    aggregate: Aggregate,
    /// Set of distinct leaf target ids has exactly one element.
    single_target_weighted: bool,
    weights_all_positive: bool,
}

/// A classifier's answer for one row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Label {
    /// The label at this index of the model's class labels.
    Class(usize),
    /// This integer (for string labels: the label at this index). Only
    /// two-class models whose leaves weight both classes give it, as
    /// onnxruntime does: 1 when the second class's score is positive,
    /// else 0.
    Raw(i64),
}

/// A feature value the walk can compare with an f32 threshold. f32, i32
/// and i64 inputs are compared as f32 and f64 inputs as f64, as onnxruntime
/// does.
pub trait Feature: Copy + Send + Sync + 'static {
    fn le(self, t: f32) -> bool;
    fn lt(self, t: f32) -> bool;
    fn ge(self, t: f32) -> bool;
    fn gt(self, t: f32) -> bool;
    fn eq(self, t: f32) -> bool;
    fn is_nan(self) -> bool;
}

impl Feature for f32 {
    #[inline(always)]
    fn le(self, t: f32) -> bool {
        self <= t
    }
    #[inline(always)]
    fn lt(self, t: f32) -> bool {
        self < t
    }
    #[inline(always)]
    fn ge(self, t: f32) -> bool {
        self >= t
    }
    #[inline(always)]
    fn gt(self, t: f32) -> bool {
        self > t
    }
    #[inline(always)]
    fn eq(self, t: f32) -> bool {
        self == t
    }
    #[inline(always)]
    fn is_nan(self) -> bool {
        f32::is_nan(self)
    }
}

impl Feature for f64 {
    #[inline(always)]
    fn le(self, t: f32) -> bool {
        self <= f64::from(t)
    }
    #[inline(always)]
    fn lt(self, t: f32) -> bool {
        self < f64::from(t)
    }
    #[inline(always)]
    fn ge(self, t: f32) -> bool {
        self >= f64::from(t)
    }
    #[inline(always)]
    fn gt(self, t: f32) -> bool {
        self > f64::from(t)
    }
    #[inline(always)]
    fn eq(self, t: f32) -> bool {
        self == f64::from(t)
    }
    #[inline(always)]
    fn is_nan(self) -> bool {
        f64::is_nan(self)
    }
}

#[inline(always)]
fn compare<T: Feature>(mode: Mode, x: T, t: f32) -> bool {
    match mode {
        Mode::Leq => x.le(t),
        Mode::Lt => x.lt(t),
        Mode::Gte => x.ge(t),
        Mode::Gt => x.gt(t),
        Mode::Eq => x.eq(t),
        Mode::Neq => !x.eq(t),
        Mode::Leaf => false,
    }
}

/// The f32 threshold that makes `x MODE t32` equal `x MODE t64` for every
/// f32 `x` (and for f64 `x` up to the rounding of the threshold itself).
fn round_threshold(mode: Mode, t: f64) -> f32 {
    let near = t as f32;
    if t.is_nan() || f64::from(near) == t {
        return near;
    }
    let (down, up) = if f64::from(near) < t {
        (near, next_up(near))
    } else {
        (next_down(near), near)
    };
    match mode {
        // x <= t  <=>  x <= largest f32 below t; x > t likewise.
        Mode::Leq | Mode::Gt => down,
        // x < t  <=>  x < smallest f32 above t; x >= t likewise.
        Mode::Lt | Mode::Gte => up,
        // No f32 equals t: EQ is never true, NEQ always (NaN compares so).
        Mode::Eq | Mode::Neq => f32::NAN,
        Mode::Leaf => near,
    }
}

fn next_up(x: f32) -> f32 {
    if x.is_infinite() && x > 0.0 {
        return x;
    }
    let bits = x.to_bits();
    if x == 0.0 {
        f32::from_bits(1)
    } else if x > 0.0 {
        f32::from_bits(bits + 1)
    } else {
        f32::from_bits(bits - 1)
    }
}

fn next_down(x: f32) -> f32 {
    -next_up(-x)
}

fn bad(attr: &'static str, msg: String) -> SpecError {
    SpecError::Attr { attr, msg }
}

impl Ensemble {
    /// Checks `attrs` and lays the trees out. Every inconsistency (length
    /// mismatch, dangling child, cycle, shared child, target out of range)
    /// is an error naming the attribute.
    // The attributes are parallel arrays indexed by node.
    #[allow(clippy::needless_range_loop)]
    pub fn build(attrs: &TreeAttrs) -> Result<Ensemble, SpecError> {
        let n = attrs.nodes_nodeids.len();
        if n == 0 {
            return Err(bad("nodes_nodeids", "the ensemble has no nodes".into()));
        }
        let same = |attr: &'static str, len: usize| {
            if len == n {
                Ok(())
            } else {
                Err(bad(
                    attr,
                    format!("has {len} entries, nodes_nodeids has {n}"),
                ))
            }
        };
        same("nodes_treeids", attrs.nodes_treeids.len())?;
        same("nodes_featureids", attrs.nodes_featureids.len())?;
        same("nodes_modes", attrs.nodes_modes.len())?;
        same("nodes_values", attrs.nodes_values.len())?;
        same("nodes_truenodeids", attrs.nodes_truenodeids.len())?;
        same("nodes_falsenodeids", attrs.nodes_falsenodeids.len())?;
        if !attrs.nodes_missing_value_tracks_true.is_empty() {
            same(
                "nodes_missing_value_tracks_true",
                attrs.nodes_missing_value_tracks_true.len(),
            )?;
        }
        let nl = attrs.leaf_weights.len();
        for (attr, len) in [
            ("leaf treeids", attrs.leaf_treeids.len()),
            ("leaf nodeids", attrs.leaf_nodeids.len()),
            ("leaf ids", attrs.leaf_targetids.len()),
        ] {
            if len != nl {
                return Err(bad(
                    attr,
                    format!("has {len} entries, the weights have {nl}"),
                ));
            }
        }
        if attrs.n_targets == 0 {
            return Err(bad("n_targets", "must be at least 1".into()));
        }
        if attrs.n_targets > (1 << 20) {
            return Err(bad(
                "n_targets",
                format!("{} is too large", attrs.n_targets),
            ));
        }
        if !attrs.base_values.is_empty()
            && attrs.base_values.len() != attrs.n_targets
            && attrs.base_values.len() > 2
        {
            return Err(bad(
                "base_values",
                format!(
                    "has {} entries, expected {} (or none)",
                    attrs.base_values.len(),
                    attrs.n_targets
                ),
            ));
        }

        // (tree, node) -> attribute index.
        let mut by_id: HashMap<(i64, i64), usize> = HashMap::with_capacity(n);
        for i in 0..n {
            let key = (attrs.nodes_treeids[i], attrs.nodes_nodeids[i]);
            if by_id.insert(key, i).is_some() {
                return Err(bad(
                    "nodes_nodeids",
                    format!("node {} of tree {} is listed twice", key.1, key.0),
                ));
            }
        }
        // Children and parent counts.
        let mut parents = vec![0u32; n];
        let mut children = vec![(usize::MAX, usize::MAX); n];
        let mut n_features = 0usize;
        for i in 0..n {
            if attrs.nodes_modes[i] == Mode::Leaf {
                continue;
            }
            let tree = attrs.nodes_treeids[i];
            let f = attrs.nodes_featureids[i];
            if f < 0 || f as u64 >= MAX_FEATURES as u64 {
                return Err(bad(
                    "nodes_featureids",
                    format!("feature index {f} is out of range"),
                ));
            }
            n_features = n_features.max(f as usize + 1);
            let child = |attr: &'static str, id: i64| {
                by_id.get(&(tree, id)).copied().ok_or_else(|| {
                    bad(
                        attr,
                        format!(
                            "node {} of tree {tree} points to node {id}, which does not exist",
                            attrs.nodes_nodeids[i]
                        ),
                    )
                })
            };
            let t = child("nodes_truenodeids", attrs.nodes_truenodeids[i])?;
            let f = child("nodes_falsenodeids", attrs.nodes_falsenodeids[i])?;
            for c in [t, f] {
                parents[c] += 1;
                if parents[c] > 1 {
                    return Err(bad(
                        "nodes_truenodeids",
                        format!(
                            "node {} of tree {tree} has more than one parent (or a branch \
                             points to it twice); trees must not share nodes",
                            attrs.nodes_nodeids[c]
                        ),
                    ));
                }
            }
            children[i] = (t, f);
        }
        // Roots, in tree id order (the order scores are summed in).
        let mut root_of_tree: Vec<(i64, usize)> = Vec::new();
        let mut tree_sizes: HashMap<i64, usize> = HashMap::new();
        for i in 0..n {
            *tree_sizes.entry(attrs.nodes_treeids[i]).or_default() += 1;
            if parents[i] == 0 {
                root_of_tree.push((attrs.nodes_treeids[i], i));
            }
        }
        root_of_tree.sort_unstable();
        for w in root_of_tree.windows(2) {
            if w[0].0 == w[1].0 {
                return Err(bad(
                    "nodes_treeids",
                    format!("tree {} has more than one root", w[0].0),
                ));
            }
        }
        if root_of_tree.len() != tree_sizes.len() {
            return Err(bad(
                "nodes_truenodeids",
                "a tree has no root: its nodes form a cycle".into(),
            ));
        }

        // Leaf weights grouped by node, in attribute order.
        let mut weights_of: Vec<Vec<usize>> = vec![Vec::new(); n];
        let mut targets_seen = std::collections::BTreeSet::new();
        let mut weights_all_positive = true;
        for k in 0..nl {
            let key = (attrs.leaf_treeids[k], attrs.leaf_nodeids[k]);
            let Some(&i) = by_id.get(&key) else {
                return Err(bad(
                    "leaf nodeids",
                    format!(
                        "weight {k} names node {} of tree {}, which does not exist",
                        key.1, key.0
                    ),
                ));
            };
            if attrs.nodes_modes[i] != Mode::Leaf {
                return Err(bad(
                    "leaf nodeids",
                    format!(
                        "weight {k} names node {} of tree {}, which is not a leaf",
                        key.1, key.0
                    ),
                ));
            }
            let t = attrs.leaf_targetids[k];
            if t < 0 || t as u64 >= attrs.n_targets as u64 {
                return Err(bad(
                    "leaf ids",
                    format!(
                        "weight {k} is for class/target {t}, outside 0..{}",
                        attrs.n_targets
                    ),
                ));
            }
            targets_seen.insert(t);
            weights_all_positive &= attrs.leaf_weights[k] >= 0.0;
            weights_of[i].push(k);
        }

        // Lay every tree out depth first from its root, the false child
        // right after its parent.
        let mut nodes: Vec<Node> = Vec::with_capacity(n);
        let mut leaf_targets = Vec::with_capacity(nl);
        let mut leaf_weights = Vec::with_capacity(nl);
        let mut roots = Vec::with_capacity(root_of_tree.len());
        let mut modes = std::collections::BTreeSet::new();
        let mut any_missing_true = false;
        // (attribute index, slot in `nodes` whose child field to patch: (slot, is_true))
        let mut stack: Vec<(usize, Option<(usize, bool)>)> = Vec::new();
        for &(tree, root) in &root_of_tree {
            let start = nodes.len();
            roots.push(start as u32);
            stack.push((root, None));
            while let Some((i, patch)) = stack.pop() {
                let slot = nodes.len();
                if let Some((p, is_true)) = patch {
                    if is_true {
                        nodes[p].a = slot as u32;
                    } else {
                        nodes[p].b = slot as u32;
                    }
                }
                let mode = attrs.nodes_modes[i];
                if mode == Mode::Leaf {
                    let a = leaf_targets.len() as u32;
                    for &k in &weights_of[i] {
                        leaf_targets.push(attrs.leaf_targetids[k] as u32);
                        leaf_weights.push(attrs.leaf_weights[k]);
                    }
                    nodes.push(Node {
                        meta: (Mode::Leaf as u32) << MODE_SHIFT,
                        threshold: 0.0,
                        a,
                        b: leaf_targets.len() as u32,
                    });
                    continue;
                }
                modes.insert(mode as u8);
                let missing = attrs
                    .nodes_missing_value_tracks_true
                    .get(i)
                    .copied()
                    .unwrap_or(false);
                any_missing_true |= missing;
                let threshold = match attrs.nodes_values[i] {
                    Threshold::F32(t) => t,
                    Threshold::F64(t) => round_threshold(mode, t),
                };
                nodes.push(Node {
                    meta: (attrs.nodes_featureids[i] as u32)
                        | ((mode as u32) << MODE_SHIFT)
                        | if missing { MISSING_TRUE } else { 0 },
                    threshold,
                    a: u32::MAX,
                    b: u32::MAX,
                });
                let (t, f) = children[i];
                // Popped first, so laid out right after the parent.
                stack.push((t, Some((slot, true))));
                stack.push((f, Some((slot, false))));
            }
            let laid = nodes.len() - start;
            if laid != tree_sizes[&tree] {
                return Err(bad(
                    "nodes_truenodeids",
                    format!(
                        "tree {tree}: {} of its {} nodes are not reachable from its root",
                        tree_sizes[&tree] - laid,
                        tree_sizes[&tree]
                    ),
                ));
            }
        }
        if nodes.len() > u32::MAX as usize / 2 || leaf_targets.len() > u32::MAX as usize / 2 {
            return Err(bad("nodes_nodeids", "too many nodes".into()));
        }
        let uniform_mode = match modes.len() {
            0 => Some(Mode::Leq), // only leaves: no comparison is ever made
            1 => modes.first().map(|&m| Mode::from_bits(u32::from(m))),
            _ => None,
        };
        Ok(Ensemble {
            nodes,
            roots,
            leaf_targets,
            leaf_weights,
            n_features,
            n_targets: attrs.n_targets,
            uniform_mode,
            any_missing_true,
            base_values: attrs.base_values.clone(),
            post_transform: attrs.post_transform,
            aggregate: attrs.aggregate,
            single_target_weighted: targets_seen.len() == 1,
            weights_all_positive,
        })
    }

    /// Columns the input must have at least.
    pub fn n_features(&self) -> usize {
        self.n_features
    }

    /// Scores per row (classes or targets).
    pub fn n_targets(&self) -> usize {
        self.n_targets
    }

    pub fn n_trees(&self) -> usize {
        self.roots.len()
    }

    pub fn n_nodes(&self) -> usize {
        self.nodes.len()
    }

    /// Sums (or mins/maxes) the leaf weights of every tree for each row of
    /// `x` (`rows` rows of `cols` features) into `scores` (rows x
    /// n_targets) and marks in `has` which targets received a weight.
    fn accumulate<T: Feature>(&self, x: &[T], cols: usize, scores: &mut [f32], has: &mut [bool]) {
        match (self.uniform_mode, self.any_missing_true) {
            (Some(Mode::Leq), false) => self.acc::<T, 0, false>(x, cols, scores, has),
            (Some(Mode::Lt), false) => self.acc::<T, 1, false>(x, cols, scores, has),
            (Some(Mode::Gte), false) => self.acc::<T, 2, false>(x, cols, scores, has),
            (Some(Mode::Gt), false) => self.acc::<T, 3, false>(x, cols, scores, has),
            (Some(Mode::Leq), true) => self.acc::<T, 0, true>(x, cols, scores, has),
            (Some(Mode::Gte), true) => self.acc::<T, 2, true>(x, cols, scores, has),
            (_, false) => self.acc::<T, { u8::MAX }, false>(x, cols, scores, has),
            (_, true) => self.acc::<T, { u8::MAX }, true>(x, cols, scores, has),
        }
    }

    fn acc<T: Feature, const M: u8, const MISSING: bool>(
        &self,
        x: &[T],
        cols: usize,
        scores: &mut [f32],
        has: &mut [bool],
    ) {
        let nt = self.n_targets;
        let rows = x.len() / cols;
        let minmax = matches!(self.aggregate, Aggregate::Min | Aggregate::Max);
        let is_min = self.aggregate == Aggregate::Min;
        // Trees outside, rows inside: one tree's nodes stay in cache while
        // every row of the batch walks it. The (tree, row) walks go
        // LANES at a time, interleaved step by step: a walk is a chain
        // of dependent loads and hard-to-predict branches, and
        // independent chains let the CPU overlap them (one row: eight
        // trees at once; a batch: eight rows of a tree).
        let walks = self.roots.len() * rows;
        let mut first = 0;
        while first < walks {
            let active = LANES.min(walks - first);
            let mut idx = [0usize; LANES];
            let mut lane_rows: [&[T]; LANES] = [&x[..0]; LANES];
            let mut row_of = [0usize; LANES];
            for l in 0..active {
                let (t, r) = ((first + l) / rows, (first + l) % rows);
                idx[l] = self.roots[t] as usize;
                lane_rows[l] = &x[r * cols..(r + 1) * cols];
                row_of[l] = r;
            }
            first += active;
            let leaves = self.walk_lanes::<T, M, MISSING>(&mut idx, &lane_rows, active);
            for (&r, &(a, b)) in row_of.iter().zip(&leaves).take(active) {
                if nt == 1 {
                    // One target: like onnxruntime, a leaf counts with the
                    // sum of its weights, 0 when it has none (so MIN/MAX see
                    // that 0).
                    let w: f32 = self.leaf_weights[a..b].iter().sum();
                    let (s, h) = (&mut scores[r], &mut has[r]);
                    if !minmax {
                        *s += w;
                    } else if !*h || (if is_min { w < *s } else { w > *s }) {
                        *s = w;
                    }
                    *h = true;
                    continue;
                }
                let s = &mut scores[r * nt..(r + 1) * nt];
                let h = &mut has[r * nt..(r + 1) * nt];
                for k in a..b {
                    let t = self.leaf_targets[k] as usize;
                    let w = self.leaf_weights[k];
                    if minmax {
                        if !h[t] || (if is_min { w < s[t] } else { w > s[t] }) {
                            s[t] = w;
                        }
                    } else {
                        s[t] += w;
                    }
                    h[t] = true;
                }
            }
        }
    }

    /// Walks the first `active` lanes' trees (from `idx`, their roots) for
    /// their rows, one step of each live walk per round; per lane, the
    /// leaf it ends in as a range into the leaf arrays.
    #[inline(always)]
    fn walk_lanes<T: Feature, const M: u8, const MISSING: bool>(
        &self,
        idx: &mut [usize; LANES],
        rows: &[&[T]; LANES],
        active: usize,
    ) -> [(usize, usize); LANES] {
        let mut out = [(0, 0); LANES];
        let mut live: u32 = (1u32 << active) - 1;
        while live != 0 {
            for l in 0..LANES {
                if live & (1 << l) == 0 {
                    continue;
                }
                // Indices were checked at build time and rows are at least
                // n_features long, so these lookups never fail; a failure
                // would be a bug, reported by the slice bounds check.
                let n = self.nodes[idx[l]];
                let mode = if M == u8::MAX {
                    Mode::from_bits((n.meta >> MODE_SHIFT) & 0xF)
                } else if (n.meta >> MODE_SHIFT) & 0xF == Mode::Leaf as u32 {
                    Mode::Leaf
                } else {
                    Mode::from_bits(u32::from(M))
                };
                if mode == Mode::Leaf {
                    out[l] = (n.a as usize, n.b as usize);
                    live &= !(1 << l);
                    continue;
                }
                let x = rows[l][(n.meta & FEATURE_MASK) as usize];
                let go_true = compare(mode, x, n.threshold)
                    || (MISSING && n.meta & MISSING_TRUE != 0 && x.is_nan());
                idx[l] = if go_true { n.a } else { n.b } as usize;
            }
        }
        out
    }

    /// Runs a regressor: returns rows x n_targets values.
    pub fn regress<T: Feature>(&self, x: &[T], cols: usize) -> Result<Vec<f32>, SpecError> {
        let rows = self.check_input(x, cols)?;
        let nt = self.n_targets;
        let mut scores = vec![0f32; rows * nt];
        let mut has = vec![false; rows * nt];
        self.accumulate(x, cols, &mut scores, &mut has);
        let n_trees = self.roots.len() as f32;
        let use_base = self.base_values.len() == nt;
        let origin = if self.base_values.len() == 1 {
            self.base_values[0]
        } else {
            0.0
        };
        let mut buf: Vec<f32> = Vec::with_capacity(nt);
        for r in 0..rows {
            let s = &mut scores[r * nt..(r + 1) * nt];
            let h = &has[r * nt..(r + 1) * nt];
            if nt == 1 {
                let v = match self.aggregate {
                    Aggregate::Sum => s[0] + origin,
                    Aggregate::Average => s[0] / n_trees + origin,
                    Aggregate::Min | Aggregate::Max => {
                        if h[0] {
                            s[0] + origin
                        } else {
                            origin
                        }
                    }
                };
                s[0] = if self.post_transform == PostTransform::Probit {
                    probit(v)
                } else {
                    v
                };
                continue;
            }
            for t in 0..nt {
                let base = if use_base { self.base_values[t] } else { 0.0 };
                // As in onnxruntime, a target no leaf weighted reads 0,
                // base value or not.
                s[t] = if !h[t] {
                    0.0
                } else {
                    match self.aggregate {
                        Aggregate::Sum | Aggregate::Min | Aggregate::Max => s[t] + base,
                        Aggregate::Average => s[t] / n_trees + base,
                    }
                };
            }
            buf.clear();
            buf.extend_from_slice(s);
            transform(&mut buf, self.post_transform);
            s.copy_from_slice(&buf);
        }
        Ok(scores)
    }

    /// Runs a classifier: returns, per row, the predicted label and rows x
    /// n_classes scores.
    pub fn classify<T: Feature>(
        &self,
        x: &[T],
        cols: usize,
    ) -> Result<(Vec<Label>, Vec<f32>), SpecError> {
        let rows = self.check_input(x, cols)?;
        let nc = self.n_targets;
        let mut scores = vec![0f32; rows * nc];
        let mut has = vec![false; rows * nc];
        self.accumulate(x, cols, &mut scores, &mut has);
        let mut labels = Vec::with_capacity(rows);
        let mut buf: Vec<f32> = Vec::with_capacity(nc.max(2));
        for r in 0..rows {
            let s = &mut scores[r * nc..(r + 1) * nc];
            let h = &mut has[r * nc..(r + 1) * nc];
            buf.clear();
            let label = if nc > 2 {
                for (k, b) in self.base_values.iter().enumerate().take(nc) {
                    if h[k] {
                        s[k] += b;
                    } else {
                        s[k] = *b;
                        h[k] = true;
                    }
                }
                // First maximum among classes that got a score.
                let mut best: Option<usize> = None;
                for k in 0..nc {
                    if h[k] && best.is_none_or(|b| s[k] > s[b]) {
                        best = Some(k);
                    }
                }
                buf.extend_from_slice(s);
                transform(&mut buf, self.post_transform);
                Label::Class(best.unwrap_or(0))
            } else if nc == 2 {
                self.binary(s, h, &mut buf)
            } else {
                // One class: onnxruntime's single-score path.
                let mut v = s[0];
                if self.base_values.len() == 1 {
                    v += self.base_values[0];
                }
                buf.push(v);
                transform(&mut buf, self.post_transform);
                Label::Class(0)
            };
            labels.push(label);
            for (k, o) in s.iter_mut().enumerate() {
                *o = buf.get(k).copied().unwrap_or(0.0);
            }
        }
        Ok((labels, scores))
    }

    /// onnxruntime's two-class rules: with only one class ever weighted (the
    /// usual gradient boosting export) the score is that of the positive
    /// class and the other column is derived from it.
    fn binary(&self, s: &mut [f32], h: &[bool], out: &mut Vec<f32>) -> Label {
        let (mut s0, mut s1) = (s[0], s[1]);
        let (h0, mut h1) = (h[0], h[1]);
        let mut two = true;
        // -1: none; 0/1: positive weights, positive/negative wins; 2/3: mixed.
        let mut extra: i32 = -1;
        match self.base_values.len() {
            2 => {
                if h1 {
                    s1 = self.base_values[1] + s0;
                    s0 = -s1;
                    h1 = true;
                } else {
                    s1 += self.base_values[1];
                    s0 += self.base_values[0];
                }
            }
            1 => {
                s0 += self.base_values[0];
                two = h1;
            }
            0 => {
                extra = 3;
                two = h1;
            }
            _ => {}
        }
        let pos = if two && h1 {
            s1
        } else if h0 {
            s0
        } else {
            0.0
        };
        let label = if self.single_target_weighted {
            Label::Class(if self.weights_all_positive {
                if pos > 0.5 {
                    extra = 0;
                    1
                } else {
                    extra = 1;
                    0
                }
            } else if pos > 0.0 {
                extra = 2;
                1
            } else {
                extra = 3;
                0
            })
        } else {
            // onnxruntime answers the literal labels 1 and 0 here, whatever
            // the model's labels are (for string labels: the first or second).
            Label::Raw(i64::from(pos > 0.0))
        };
        // A class that no leaf (and no base value rule) scored counts as 0.
        let s0 = if h0 { s0 } else { 0.0 };
        if two {
            out.push(s0);
            out.push(if h1 { s1 } else { 0.0 });
            transform(out, self.post_transform);
        } else if self.post_transform == PostTransform::Probit {
            // onnxruntime writes one score and leaves the second column
            // unset (it reads back as NaN there); NaN says "undefined".
            out.push(probit(s0));
            out.push(f32::NAN);
        } else {
            match extra {
                0 | 1 => {
                    out.push(1.0 - s0);
                    out.push(s0);
                }
                2 | 3 if self.post_transform == PostTransform::Logistic => {
                    out.push(logistic(-s0));
                    out.push(logistic(s0));
                }
                2 | 3 => {
                    out.push(-s0);
                    out.push(s0);
                }
                _ => out.push(s0),
            }
        }
        label
    }

    fn check_input<T>(&self, x: &[T], cols: usize) -> Result<usize, SpecError> {
        if cols < self.n_features {
            return Err(SpecError::Input(format!(
                "the input has {cols} features per row, the trees read feature {}",
                self.n_features - 1
            )));
        }
        if cols == 0 {
            return Ok(0);
        }
        if !x.len().is_multiple_of(cols) {
            return Err(SpecError::Input(format!(
                "{} values do not make rows of {cols}",
                x.len()
            )));
        }
        Ok(x.len() / cols)
    }
}

/// onnxruntime's logistic, written to stay accurate for large |x|.
pub fn logistic(x: f32) -> f32 {
    let v = 1.0 / (1.0 + (-x.abs()).exp());
    if x < 0.0 {
        1.0 - v
    } else {
        v
    }
}

/// onnxruntime's probit: sqrt(2) * erfinv(2x - 1) with the same
/// closed-form erfinv approximation (Winitzki, a = 0.147), so results agree
/// with it rather than with an exact inverse error function.
// onnxruntime's constants (1.41421356f, 3.14159f), kept for agreement.
#[allow(clippy::approx_constant)]
pub fn probit(x: f32) -> f32 {
    1.414_213_6_f32 * erf_inv(2.0 * x - 1.0)
}

#[allow(clippy::approx_constant)]
fn erf_inv(x: f32) -> f32 {
    let sgn = if x < 0.0 { -1.0f32 } else { 1.0 };
    let x = (1.0 - x) * (1.0 + x);
    let log = x.ln();
    let v = 2.0 / (3.14159f32 * 0.147) + 0.5 * log;
    let v2 = 1.0 / 0.147f32 * log;
    let v3 = -v + (v * v - v2).sqrt();
    sgn * v3.sqrt()
}

/// Applies a post transform to one row of two or more scores.
pub fn transform(s: &mut [f32], t: PostTransform) {
    match t {
        PostTransform::None => {}
        PostTransform::Logistic => s.iter_mut().for_each(|v| *v = logistic(*v)),
        PostTransform::Probit => s.iter_mut().for_each(|v| *v = probit(*v)),
        PostTransform::Softmax => {
            let max = s.iter().copied().fold(-f32::MAX, f32::max);
            let mut sum = 0.0;
            for v in s.iter_mut() {
                *v = (*v - max).exp();
                sum += *v;
            }
            s.iter_mut().for_each(|v| *v /= sum);
        }
        PostTransform::SoftmaxZero => {
            let max = s.iter().copied().fold(-f32::MAX, f32::max);
            let exp_neg_max = (-max).exp();
            let mut sum = 0.0;
            for v in s.iter_mut() {
                if *v > 0.000_000_1 || *v < -0.000_000_1 {
                    *v = (*v - max).exp();
                    sum += *v;
                } else {
                    *v *= exp_neg_max;
                }
            }
            s.iter_mut().for_each(|v| *v /= sum);
        }
    }
}

#[cfg(test)]
mod tests;
