"""Check yourself: the course material's questions, answered on the loaded model's own cache.

    live.py       one real run on the loaded model, measured: the numbers every answer cites
    whatif.py     a what-if the weights never see: a head's W_k and W_v replaced by its W_q
    questions.py  a question as shown, grading, per-session shuffling, ids for links
    bank.py       the question bank: templates + the function that computes each question's facts

No Streamlit here (pages/quiz.py shows it). Imports engine, economics and geometry only.
"""
