"""AI feedback (RLAIF): labeler prompts, soft preference labels, direct scoring (d-RLAIF), labeler metrics."""
