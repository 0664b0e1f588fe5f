"""The MLflow side that runs in parallel: corpora recorded as datasets by runs started side by side."""

import threading

from avssl.data.corpus import Corpus
from avssl.tracking import Tracker


def test_runs_started_together_record_the_same_corpus_without_failing(tmp_path, synth_corpus):
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "avssl")
    corpus = Corpus(synth_corpus)
    runs = [tracker.start_run(f"r{i}", {"avssl.kind": "pretrain"}) for i in range(4)]
    start, errors = threading.Barrier(len(runs)), []

    def record(run_id: str) -> None:
        start.wait()
        try:
            Tracker(tracker.uri, "avssl").log_corpus(run_id, corpus, "pretraining")
        except Exception as e:  # the test fails on any
            errors.append(e)

    threads = [threading.Thread(target=record, args=(r,)) for r in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for run_id in runs:
        inputs = tracker.client.get_run(run_id).inputs.dataset_inputs
        assert [(d.dataset.name, d.dataset.digest) for d in inputs] == [(corpus.name, corpus.digest())]
