"""Language models: query logs of completions given prompts (`query_log`), per-token scores
(`token_influence`), their heat maps (`print_heatmap`, `heatmap_html`, `heatmap_png`) and a check
that padding and attention implementations leave the rows alone (`check_consistency`); attention
heads scored apart (`attention_heads`, `head_groups`)."""

from logix.text.check import check_consistency
from logix.text.heads import attention_heads, head_groups
from logix.text.heatmap import heatmap_html, heatmap_png, print_heatmap
from logix.text.queries import query_log
from logix.text.tokens import token_influence

__all__ = ["query_log", "token_influence", "print_heatmap", "heatmap_html", "heatmap_png",
           "check_consistency", "attention_heads", "head_groups"]
