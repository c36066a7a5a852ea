"""Two-tower retrieval model and its losses.

The user tower sees the user id, demographics and the recent history: item id embeddings
(shared with the item tower, so history and candidates live in one space) plus a recency
position embedding and a rating embedding, pooled by learned attention. A new interaction
therefore moves the user vector without retraining, and a user never seen in training
(id 0) still gets a vector from features and history. Both towers end L2-normalised, so the
inner product the HNSW index searches is a cosine similarity.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ItemTower(nn.Module):
    """Item id embedding (0 = unknown / new item) + genres + dense features + categorical features, and with
    ``text_dim`` the item's frozen sentence vector through a trained projection into the id embedding's space.

    The projection is added to the id embedding: an item's identity is its content plus what its interactions
    taught its id. Training zeroes ids at random (``--recall-id-dropout``), so the content path alone must
    place an item too, and an item nobody has interacted with yet (id 0) is placed by its text and features.
    """

    def __init__(self, n_items: int, n_genres: int, n_dense: int, cat_sizes: list[int], emb_dim: int, dim: int, hidden: int,
                 text_dim: int = 0):
        super().__init__()
        self.id_emb = nn.Embedding(n_items + 1, emb_dim, padding_idx=0)
        self.cat_embs = nn.ModuleList(nn.Embedding(size, 8) for size in cat_sizes)
        in_dim = emb_dim + n_genres + n_dense + 8 * len(cat_sizes)
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.skip = nn.Linear(emb_dim, dim, bias=False)
        self.text_proj = nn.Linear(text_dim, emb_dim) if text_dim else None  # created last: no text, same init draws

    def forward(self, item_id: torch.Tensor, genres: torch.Tensor, dense: torch.Tensor, cat: torch.Tensor,
                text: torch.Tensor | None = None) -> torch.Tensor:
        e = self.id_emb(item_id)
        if self.text_proj is not None:
            e = e + self.text_proj(text)
        parts = [e, genres, dense] + [emb(cat[:, j]) for j, emb in enumerate(self.cat_embs)]
        return F.normalize(self.mlp(torch.cat(parts, dim=-1)) + self.skip(e), dim=-1)


class UserTower(nn.Module):
    """User id + demographics + attention-pooled recent history -> unit vector."""

    def __init__(
        self,
        n_users: int,
        item_id_emb: nn.Embedding,
        cat_sizes: list[int],
        n_numeric: int,
        history_len: int,
        emb_dim: int,
        dim: int,
        hidden: int,
    ):
        super().__init__()
        self.item_id_emb = item_id_emb  # shared with the item tower
        self.user_emb = nn.Embedding(n_users + 1, emb_dim, padding_idx=0)
        self.cat_embs = nn.ModuleList(nn.Embedding(size, 8) for size in cat_sizes)
        self.position_emb = nn.Embedding(history_len, emb_dim)  # slot history_len-1 = newest
        self.rating_emb = nn.Embedding(6, emb_dim)  # 0 = unknown, 1..5
        self.attn = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.Tanh(), nn.Linear(emb_dim, 1))
        in_dim = 2 * emb_dim + 8 * len(cat_sizes) + n_numeric
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.skip = nn.Linear(emb_dim, dim, bias=False)

    def forward(
        self, user_id: torch.Tensor, cat: torch.Tensor, num: torch.Tensor, hist_items: torch.Tensor, hist_ratings: torch.Tensor
    ) -> torch.Tensor:
        pooled = self.pool_history(hist_items, hist_ratings)
        parts = [self.user_emb(user_id), pooled, num] + [emb(cat[:, j]) for j, emb in enumerate(self.cat_embs)]
        return F.normalize(self.mlp(torch.cat(parts, dim=-1)) + self.skip(pooled), dim=-1)

    def pool_history(self, hist_items: torch.Tensor, hist_ratings: torch.Tensor) -> torch.Tensor:
        """Attention over the window; an empty window pools to zeros."""
        positions = torch.arange(hist_items.shape[1], device=hist_items.device)
        h = self.item_id_emb(hist_items) + self.position_emb(positions)[None] + self.rating_emb(hist_ratings)
        mask = hist_items > 0
        logits = self.attn(h).squeeze(-1).masked_fill(~mask, -1e4)
        weights = torch.softmax(logits.float(), dim=-1).to(h.dtype) * mask
        return (weights.unsqueeze(-1) * h).sum(dim=1)


class TwoTower(nn.Module):
    """Both towers; ``config`` holds the constructor arguments so a bundle can rebuild it."""

    def __init__(self, n_users: int, n_items: int, n_genres: int, n_item_dense: int, item_cat_sizes: list[int],
                 user_cat_sizes: list[int], n_user_numeric: int, history_len: int = 50, emb_dim: int = 64,
                 dim: int = 64, hidden: int = 256, text_dim: int = 0):
        super().__init__()
        self.config = dict(n_users=n_users, n_items=n_items, n_genres=n_genres, n_item_dense=n_item_dense,
                           item_cat_sizes=item_cat_sizes, user_cat_sizes=user_cat_sizes, n_user_numeric=n_user_numeric,
                           history_len=history_len, emb_dim=emb_dim, dim=dim, hidden=hidden, text_dim=text_dim)
        self.item_tower = ItemTower(n_items, n_genres, n_item_dense, item_cat_sizes, emb_dim, dim, hidden, text_dim)
        self.user_tower = UserTower(n_users, self.item_tower.id_emb, user_cat_sizes, n_user_numeric, history_len, emb_dim, dim, hidden)


def sampled_softmax_loss(
    user: torch.Tensor,
    pos: torch.Tensor,
    pos_ids: torch.Tensor,
    log_q: torch.Tensor,
    temperature: float,
    neg: torch.Tensor | None = None,
    neg_ids: torch.Tensor | None = None,
    neg_log_q: torch.Tensor | None = None,
    first_row: int = 0,
) -> torch.Tensor:
    """InfoNCE over in-batch negatives with log-Q correction (Yi et al., RecSys 2019).

    ``pos``: ``[C, d]``, the batch's positives, which are every row's in-batch negatives; ``user``:
    ``[B, d]`` rows whose own positive is column ``first_row + i`` (B = C and 0 on one process; with
    several, the columns are the global batch gathered from every rank and the rows this rank's
    share). ``log_q[j]``: log of how often item ``pos_ids[j]`` is expected in a (global) batch (its
    sampling probability times C), subtracted from every logit of that column, the positive's
    included, so popular items are not over-penalised as negatives.
    ``neg``: optional extra negatives, ``[M, d]`` shared by all rows or ``[B, H, d]`` per row,
    with ids (for masking accidental hits) and their own log-Q. Columns holding the row's own
    positive item (other than its own column) are masked out.
    """
    own = first_row + torch.arange(len(user), device=user.device)
    row_ids = pos_ids[own]
    logits = user @ pos.T / temperature - log_q[None, :]
    columns = torch.arange(len(pos_ids), device=user.device)
    same = pos_ids[None, :] == row_ids[:, None]
    logits = logits.masked_fill(same & (columns[None, :] != own[:, None]), float("-inf"))
    parts = [logits]
    if neg is not None:
        if neg.dim() == 2:
            extra = user @ neg.T / temperature - neg_log_q[None, :]
            extra = extra.masked_fill(neg_ids[None, :] == row_ids[:, None], float("-inf"))
        else:
            extra = (user.unsqueeze(1) * neg).sum(-1) / temperature - neg_log_q
            extra = extra.masked_fill(neg_ids == row_ids[:, None], float("-inf"))
        parts.append(extra)
    all_logits = torch.cat(parts, dim=1).float()
    return F.cross_entropy(all_logits, own)


def bpr_loss(
    user: torch.Tensor, pos: torch.Tensor, pos_ids: torch.Tensor, neg: torch.Tensor | None = None,
    neg_ids: torch.Tensor | None = None, first_row: int = 0,
) -> torch.Tensor:
    """Bayesian personalised ranking: ``-log sigmoid(s_pos - s_neg)`` over in-batch (+ extra) negatives.
    Rows and columns as in ``sampled_softmax_loss``; the mean is over this rank's pairs."""
    own = first_row + torch.arange(len(user), device=user.device)
    row_ids = pos_ids[own]
    pos_score = (user * pos[own]).sum(-1, keepdim=True)
    neg_scores = [user @ pos.T]
    masks = [pos_ids[None, :] != row_ids[:, None]]
    if neg is not None:
        neg_scores.append(user @ neg.T if neg.dim() == 2 else (user.unsqueeze(1) * neg).sum(-1))
        masks.append((neg_ids[None, :] if neg.dim() == 2 else neg_ids) != row_ids[:, None])
    scores, mask = torch.cat(neg_scores, 1).float(), torch.cat(masks, 1)
    losses = -F.logsigmoid(pos_score.float() - scores)
    return (losses * mask).sum() / mask.sum().clamp(min=1)
