"""load_tokenizer without a network: one quick request, then a one-line BackboneError."""
import os

import pytest


@pytest.fixture
def no_cache_no_hub(monkeypatch):
    """No HF cache (only local folders load) and a hub that does not answer."""
    import huggingface_hub.constants
    import huggingface_hub.utils
    import transformers

    real = transformers.AutoTokenizer.from_pretrained
    calls, requests = [], []

    def from_pretrained(name, **kwargs):
        calls.append((name, kwargs))
        if os.path.isdir(name):
            return real(name, **kwargs)
        raise OSError(f"{name} is not in the cache")

    class Unreachable:
        def head(self, url, **kwargs):
            requests.append(url)
            raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", from_pretrained)
    monkeypatch.setattr(huggingface_hub.utils, "get_session", Unreachable)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "https://huggingface.co")
    return calls, requests


def test_roberta_offline_fails_at_once_naming_the_key_and_the_fix(no_cache_no_hub):
    from hat.backbones import BackboneError, load_tokenizer

    calls, requests = no_cache_no_hub
    with pytest.raises(BackboneError) as error:
        load_tokenizer("roberta-base")
    assert str(error.value) == (
        "text_backbone=roberta-base: tokenizer not in a local folder or the HF cache, and not from the hub "
        "(the hub is unreachable (ConnectionError)); download the model folder "
        "(hf download roberta-base --local-dir DIR) and pass text_backbone=DIR")
    assert calls == [("roberta-base", {"local_files_only": True})]  # no retrying download attempt
    assert requests == ["https://huggingface.co/api/models/roberta-base"]


def test_bert_base_uncased_still_falls_back_to_the_packaged_vocabulary(no_cache_no_hub):
    from hat.backbones import load_tokenizer

    calls, requests = no_cache_no_hub
    tokenizer = load_tokenizer("bert-base-uncased")
    assert tokenizer.vocab_size == 30522 and tokenizer("a red circle")["input_ids"][0] == 101
    assert requests == [] and calls[0] == ("bert-base-uncased", {"local_files_only": True})
