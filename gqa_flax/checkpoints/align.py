"""Aligning attention heads with orthogonal rotations before their keys and values are pooled
(`gqa-convert --method aligned`; "Align attention heads before merging them", arXiv
2412.20677, there for LLaMA-2).

A head's attention is unchanged when an orthogonal R [head_dim, head_dim] rotates both its
query and key projections (q R . k R = q . k) and an orthogonal P rotates its value
projection while P^T rotates its rows of the output projection (v P P^T W_o = v W_o). T5 has
no rotary embedding and its relative position bias does not depend on q or k, so in T5 both
moves are exact. Pooling a group of heads loses less when the group's heads first agree:
each head's rotation is the orthogonal Procrustes solution that maps it closest to the
group's mean (generalised Procrustes: the mean is recomputed and the heads realigned a few
times), closest in the metric of the projection's inputs: ||X A R - X T||_F for inputs X
with second moment `gram` = X^T X [emb, emb] (None: the identity, i.e. the kernels' own
Frobenius norm).

Heads are grouped first (`convert.balanced_groups`) by a similarity that rotations do not
change: the largest cosine any rotation gives two heads, ||A_i^T C A_j||_* / (||A_i||_C
||A_j||_C) (the nuclear norm; 1 for heads that are rotations of each other).
"""
from typing import Optional

import numpy as np

ITERATIONS = 5  # generalised Procrustes rounds; the mean moves little after 2-3


def heads_of(kernel: np.ndarray, head_dim: int) -> np.ndarray:
  """[emb, H*head_dim] -> [H, emb, head_dim]."""
  emb, joined = kernel.shape
  return kernel.reshape(emb, joined // head_dim, head_dim).transpose(1, 0, 2)


def _heads_in_metric(kernel: np.ndarray, head_dim: int,
                     gram: Optional[np.ndarray]) -> np.ndarray:
  """[H, emb, head_dim]: each head A as L^T A, with L L^T = gram, so that ||X A|| = ||L^T A||
  (float64; gram None: the heads themselves, the kernels' own metric)."""
  heads = heads_of(kernel.astype(np.float64), head_dim)
  if gram is None:
    return heads
  values, vectors = np.linalg.eigh(np.asarray(gram, np.float64))
  metric = vectors * np.sqrt(np.maximum(values, 0.0))
  return np.einsum("fe,hed->hfd", metric.T, heads, optimize=True)


def procrustes(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """The orthogonal R [d, d] minimising ||a R - b||_F for a, b [n, d]: U V^T of the SVD
  U S V^T of a^T b (Schoenemann 1966)."""
  u, _, vt = np.linalg.svd(a.T @ b)
  return u @ vt


def rotation_invariant_similarity(kernel: np.ndarray, head_dim: int,
                                  gram: Optional[np.ndarray] = None) -> np.ndarray:
  """[H, H]: max over orthogonal R of the cosine between head i rotated by R and head j, in
  the inputs' metric."""
  heads = _heads_in_metric(kernel, head_dim, gram)
  norms = np.maximum(np.linalg.norm(heads, axis=(1, 2)), 1e-30)
  cross = np.einsum("ied,jef->ijdf", heads, heads, optimize=True)
  nuclear = np.linalg.svd(cross, compute_uv=False).sum(-1)
  return nuclear / np.outer(norms, norms)


def group_rotations(kernel: np.ndarray, num_groups: int, head_dim: int,
                    gram: Optional[np.ndarray] = None) -> np.ndarray:
  """[H, head_dim, head_dim]: each head's rotation onto its contiguous group's mean
  (generalised Procrustes in the inputs' metric); a group's first head starts the mean."""
  heads = _heads_in_metric(kernel, head_dim, gram)
  size = len(heads) // num_groups
  rotations = np.tile(np.eye(head_dim), (len(heads), 1, 1))
  for start in range(0, len(heads), size):
    members = range(start, start + size)
    target = heads[start]
    for _ in range(ITERATIONS if size > 1 else 0):
      for h in members:
        rotations[h] = procrustes(heads[h], target)
      target = np.mean([heads[h] @ rotations[h] for h in members], axis=0)
  return rotations


def rotate_columns(kernel: np.ndarray, rotations: np.ndarray) -> np.ndarray:
  """A query, key or value kernel [emb, H*head_dim] with head h's columns times R_h."""
  head_dim = rotations.shape[-1]
  rotated = np.einsum("hed,hdf->ehf", heads_of(kernel.astype(np.float64), head_dim), rotations,
                      optimize=True)
  return rotated.reshape(kernel.shape).astype(kernel.dtype)


def rotate_rows(kernel: np.ndarray, rotations: np.ndarray) -> np.ndarray:
  """An output kernel [H*head_dim, emb] with head h's rows R_h^T times them."""
  heads, head_dim = rotations.shape[:2]
  blocks = kernel.astype(np.float64).reshape(heads, head_dim, -1)
  rotated = np.einsum("hdf,hde->hfe", rotations, blocks, optimize=True)
  return rotated.reshape(kernel.shape).astype(kernel.dtype)
