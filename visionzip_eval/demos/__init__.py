"""The demos: ``demo`` (the one-command sweep, report and picture), ``app`` + ``chat`` (Demo-Chat,
the gradio page and its plain logic), ``visualize`` (which tokens a method keeps) and
``redundancy`` (how alike the tower's tokens are, layer by layer). Nothing below imports them."""
