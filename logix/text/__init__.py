"""Language models: query logs of completions given prompts (`query_log`), per-token scores of
the query (`token_influence`) and of a training example (`train_token_scores`), their heat maps
(`print_heatmap`, `heatmap_html`, `heatmap_png`), a check that padding and attention
implementations leave the rows alone (`check_consistency`), and attention heads scored apart
(`attention_heads`, `head_groups`)."""

from logix.text.check import check_consistency
from logix.text.heads import attention_heads, head_groups
from logix.text.heatmap import heatmap_html, heatmap_png, print_heatmap
from logix.text.queries import query_log
from logix.text.tokens import token_influence
from logix.text.train_tokens import attach_train_tokens, train_token_scores

__all__ = ["query_log", "token_influence", "print_heatmap", "heatmap_html", "heatmap_png",
           "check_consistency", "attention_heads", "head_groups",
           "train_token_scores", "attach_train_tokens"]
