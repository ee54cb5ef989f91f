"""Pure Plotly figure builders: arrays and kvviz dataclasses in, `go.Figure` out.

No torch, no Streamlit. One module per page's views; `common` holds the shared look
(colour scales, token labels, layout) so every page reads the same way.
"""
