"""The `Drafter` interface of the speculative loop, its inputs, and the registry of drafters.

A drafter is a frozen dataclass (hashable: it is a static argument of the jitted loop) holding the
static settings of one call (tree, sampling, whether drafts are sampled, cache size). Its state
between loop steps is a typed pytree of its own choosing (a NamedTuple / `flax.struct`), carried
in the loop's `LoopState.drafter`. Per call, the loop does:

  state = drafter.init(ctx, Prefill(...))                       # once, after the trunk prefill
  while not done:
    candidates, state = drafter.propose(ctx, state, root_B, key)  # tokens of every tree node
    ... trunk verify (`models.extend` with the tree mask), acceptance, trunk commit ...
    state = drafter.update(ctx, state, Verify(...))             # see the accepted path

`ctx` is a `Context(trunk, module)`: the target model and the drafter's own module (`own_module`,
e.g. a draft model), both merged from traced parameters inside the jitted loop. Host-side class
methods validate the arguments before tracing and pick the default draft depth.

A new drafter is one file in this package: subclass `Drafter`, set `name`, decorate with
`@register`; `drafters/__init__.py` imports every module of the package, and
`speculative_generate(drafter=name)` finds it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jax_spec import models
from jax_spec.decoding import dynamic_tree, prng, sampling
from jax_spec.decoding.acceptance import Accepted
from jax_spec.decoding.trees import Tree

State = Any   # a drafter's own pytree



def depth_of_tree_spec(tree_spec, default: int) -> int:
  """The draft depth of a drafter that drafts to any depth (a draft model, a feature drafter):
  an explicit tree (static or dynamic) sets it; a named tree ('chain', 'default', ...) gets
  `default`."""
  if isinstance(tree_spec, dynamic_tree.DynamicTree):
    return tree_spec.depth
  if isinstance(tree_spec, str):
    return default
  return (tree_spec if isinstance(tree_spec, Tree) else Tree.from_choices(tree_spec)).max_depth


class Candidates(NamedTuple):
  """What a drafter proposes for one verify step."""
  tokens_BT: jax.Array                     # int32 [B, T]: token of every tree node, node 0 = root
  # [B, T, V] fp32 q of node t's children when they were *sampled* from it (`sample_drafts`);
  # None for deterministic drafts (argmax / top-k ranks: q is the one-hot of each child).
  draft_probs_BTV: jax.Array | None = None
  # This step's tree when it is built per step (a dynamic tree); None: the static `Drafter.tree`.
  tree: dynamic_tree.DraftTree | None = None


class Committed(NamedTuple):
  """Trunk positions [n, n + A) newly committed to the trunk cache (n: its length before), as
  `models.mtp_draft` and `models.eagle.feature_update` take them."""
  hidden_BAD: jax.Array                    # the trunk's final-normed hidden states there
  tokens_BA: jax.Array                     # int32 [B, A]: their tokens
  num_new_B: jax.Array                     # int32 [B]: valid entries per row (may be 0)
  next_token_B: jax.Array                  # int32 [B]: the token at n + num_new (the new root)


class Context(NamedTuple):
  trunk: models.Transformer                # the target model
  module: nnx.Module | None                # the drafter's own module (`own_module`), or None


class Prefill(NamedTuple):
  """The trunk prefill, as `Drafter.init` sees it."""
  outputs: models.DecodeOutputs            # per prompt position: logits, hidden, Medusa logits
  prompts_BT: jax.Array                    # int32 [B, S] right-padded prompts
  prompt_lengths_B: jax.Array              # int32 [B]
  root_B: jax.Array                        # int32 [B]: the first token, sampled from the prefill
  key: jax.Array                           # for sampled drafts

  @property
  def committed(self) -> Committed:
    """The padded prompts (positions [0, S), valid up to each row's length)."""
    return Committed(self.outputs.hidden_BTD, self.prompts_BT, self.prompt_lengths_B, self.root_B)


class Verify(NamedTuple):
  """One verify step, as `Drafter.update` sees it (after the trunk commit)."""
  outputs: models.DecodeOutputs            # the trunk `extend` outputs at every tree node
  tokens_BT: jax.Array                     # int32 [B, T]: the verified candidates
  accepted: Accepted                       # raw acceptance result (also on finished rows)
  active_B: jax.Array                      # bool [B]: the row was still generating this step
  num_accepted_B: jax.Array                # int32 [B]: accepted drafts, 0 on finished rows
  root_position_B: jax.Array               # int32 [B]: the root's position (trunk length before commit)
  key: jax.Array                           # for sampled drafts

  @property
  def path_BP(self):
    """Accepted node path, root first, [B, max_depth + 1]; -1 entries clipped to 0 (the root)."""
    return jnp.maximum(self.accepted.path_BP, 0)

  @property
  def last_node_B(self):
    """Tree node of the last accepted token (the root when nothing was accepted)."""
    return gather_nodes(self.path_BP, self.num_accepted_B[:, None])[:, 0]

  @property
  def committed(self) -> Committed:
    """The accepted path, root first (nothing on finished rows), and the next token."""
    path_BP = self.path_BP
    return Committed(gather_nodes(self.outputs.hidden_BTD, path_BP),
                     gather_nodes(self.tokens_BT, path_BP),
                     jnp.where(self.active_B, self.num_accepted_B + 1, 0),
                     self.accepted.next_token_B)


@dataclasses.dataclass(frozen=True)
class Drafter:
  """Base class: static settings + the three in-loop methods (see the module docstring)."""
  tree: Tree | dynamic_tree.DynamicTree
  sampling: sampling.SamplingConfig
  sample_drafts: bool        # sample draft tokens from the processed draft distribution (q)
  cache_len: int             # KV cache slots of the trunk and of the drafter's own caches

  name: ClassVar[str] = ''

  # --- host side, before tracing ---------------------------------------------------------------
  @classmethod
  def check_model(cls, model: models.Transformer, draft_model) -> None:
    """Raises ValueError when `model` / `draft_model` cannot drive this drafter."""

  @classmethod
  def default_depth(cls, model: models.Transformer, draft_model, tree_spec) -> int:
    """Draft depth for named trees ('chain', 'default', ...) when `num_draft` is not given."""
    raise NotImplementedError

  @classmethod
  def check_tree(cls, tree: Tree, model: models.Transformer) -> None:
    """Raises ValueError when this drafter cannot fill `tree`."""

  @classmethod
  def extra_cache_slots(cls, model: models.Transformer, tree) -> int:
    """Slots past a row's committed tokens that one step writes into this drafter's own caches
    (which have the trunk's `cache_len`); 0: no cache of its own. `speculative_generate` sizes
    the caches for the larger of this and the trunk's tree."""
    del model, tree
    return 0

  @classmethod
  def own_module(cls, model: models.Transformer, draft_model) -> nnx.Module | None:
    """The module whose parameters are passed (traced) to the loop as `Context.module`."""
    del model, draft_model
    return None

  # --- inside the jitted loop ---------------------------------------------------------------------
  def init(self, ctx: Context, prefill: Prefill) -> State:
    raise NotImplementedError

  def propose(self, ctx: Context, state: State, root_B, key) -> tuple[Candidates, State]:
    raise NotImplementedError

  def update(self, ctx: Context, state: State, verify: Verify) -> State:
    raise NotImplementedError

  # --- dynamic trees (optional) ---------------------------------------------------------------------
  # A drafter that can score the children of any tree node sets `supports_dynamic_trees` and
  # implements `expand`; its `propose` then returns `self.propose_dynamic(...)` when
  # `self.is_dynamic` (see jax_spec/decoding/dynamic_tree.py for the construction).
  supports_dynamic_trees: ClassVar[bool] = False

  @property
  def is_dynamic(self) -> bool:
    return isinstance(self.tree, dynamic_tree.DynamicTree)

  def expand(self, ctx: Context, state: State,
             frontier: dynamic_tree.Frontier) -> tuple[jax.Array, State]:
    """-> (log-probabilities [B, U, V] of the children of the U frontier nodes, state).

    Called once per level, from the root (level 0) down; -inf where a node has no children. The
    frontier's context is the tree so far (`frontier.tokens_BM`, `parent_BM`, `depths_BM`,
    `mask_BMM`): a drafter with a KV cache runs the tree so far with its ancestor mask
    (`models.extend`); one with features may keep per-node features of earlier levels in its
    state and read each entry's parent's (`parent_BM`).
    """
    raise NotImplementedError(f'drafter {self.name!r} does not build dynamic trees')

  def propose_dynamic(self, ctx: Context, state: State, root_B) -> tuple[Candidates, State]:
    tokens_BT, tree, state = dynamic_tree.build(self, ctx, state, root_B)
    return Candidates(tokens_BT, None, tree), state

  # --- helpers for subclasses ---------------------------------------------------------------------
  def probs(self, logits_NV):
    """The processed distribution (temperature / top-k / top-p) drafts are sampled from."""
    sc = self.sampling
    return sampling.target_probs(logits_NV, temperature=sc.temperature, top_k=sc.top_k,
                                 top_p=sc.top_p)

  def select_fn(self, ctx: Context, key, num_draws: int, batch: int):
    """How a draft token is picked from logits at draft index d (from 1): None (argmax), or, with
    `sample_drafts`, a sample of the processed distribution (`probs`). The noise of all
    `num_draws` draws comes from one PRNG call (see `sampling.sample_probs_exponential`)."""
    if not self.sample_drafts:
      return None
    noise_DBV = prng.exponential(key, (num_draws, batch, ctx.trunk.config.vocab_size))
    return lambda logits_BV, d: sampling.sample_probs_exponential(self.probs(logits_BV),
                                                                  noise_DBV[d - 1])


class HeadsDrafter(Drafter):
  """A drafter with one draft head per depth in the trunk model (Medusa heads, MTP modules): it
  needs the heads, drafts as deep as there are heads by default, and no deeper."""
  heads_field: ClassVar[str]        # the TransformerConfig field counting the heads
  heads_noun: ClassVar[str]         # how errors call them
  too_deep_hint: ClassVar[str] = ''

  @classmethod
  def num_heads(cls, model) -> int:
    return getattr(model.config, cls.heads_field)

  @classmethod
  def check_model(cls, model, draft_model):
    del draft_model
    if not cls.num_heads(model):
      raise ValueError(f'drafter={cls.name!r} needs a model with {cls.heads_noun} '
                       f'(config.{cls.heads_field} == 0)')

  @classmethod
  def default_depth(cls, model, draft_model, tree_spec):
    del draft_model, tree_spec
    return cls.num_heads(model)

  @classmethod
  def check_tree(cls, tree, model):
    if tree.max_depth > cls.num_heads(model):
      raise ValueError(f'tree depth {tree.max_depth} > the {cls.num_heads(model)} '
                       f'{cls.heads_noun}{cls.too_deep_hint}')


_REGISTRY: dict[str, type[Drafter]] = {}


def register(cls: type[Drafter]) -> type[Drafter]:
  """Class decorator: makes `cls` available as `speculative_generate(drafter=cls.name)`."""
  if not cls.name or cls.name in _REGISTRY:
    raise ValueError(f'drafter name {cls.name!r} is empty or already registered')
  _REGISTRY[cls.name] = cls
  return cls


def registered() -> dict[str, type[Drafter]]:
  return dict(_REGISTRY)


def gather_nodes(x_BT, idx_BP):
  """x[b, idx[b, p]] for x [B, T, ...] and idx [B, P] (idx >= 0)."""
  idx = idx_BP.reshape(idx_BP.shape + (1,) * (x_BT.ndim - 2))
  return jnp.take_along_axis(x_BT, idx, axis=1)


def chain_candidates(root_B, drafts_BJ, q_BJV=None) -> Candidates:
  """A chain's candidates: the root, then the drafts d_1..d_J. With sampled drafts, `q_BJV[:, j]`
  is the distribution d_{j+1} was sampled from, i.e. q of node j's children; the leaf (node J) has
  no children and repeats the last row (unused) so that q has one row per node."""
  tokens_BT = jnp.concatenate([root_B[:, None], drafts_BJ], axis=1)
  if q_BJV is None:
    return Candidates(tokens_BT)
  return Candidates(tokens_BT, jnp.concatenate([q_BJV, q_BJV[:, -1:]], axis=1))


def tree_tokens_from_ranks(tree: Tree, root_B, topk_JBk, chain_BJ=None):
  """Node tokens: root, then for node t the rank_t-th candidate of depth_t (chain override rank 0)."""
  depth_T, rank_T = tree.depth_T[1:] - 1, tree.rank_T[1:]
  nodes_BT = topk_JBk[depth_T, :, rank_T].T                 # [B, T-1]
  if chain_BJ is not None:
    nodes_BT = jnp.where(jnp.asarray(rank_T == 0)[None], chain_BJ[:, depth_T], nodes_BT)
  return jnp.concatenate([root_B[:, None], nodes_BT], axis=1).astype(jnp.int32)
