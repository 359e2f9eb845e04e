"""Data: records and their readers, dataset downloads, the one formatter, collators, synthetic
problems and `data stats`, one module each. Import the public names from here:
`from mlx_coconut.data import Record, FormatConfig, format_record, collate`.

Dependencies run one way: records <- download, synth <- chains; records <- format <- collate, stats.
"""

from .records import (FORMATS, Record, detect_format, load_records, normalize_answer, parse_gsm8k_answer,
                      parse_icot_line, save_records)
from .download import (COCONUT_COMMIT, GSM8K_URLS, ICOT_COMMIT, PRONTOQA_COMMIT, PRONTOQA_GENERATE,
                       PRONTOQA_REPO, PRONTOQA_SPLITS, PROSQA_URLS, download_gsm8k, download_prontoqa,
                       download_prosqa, fetch, prontoqa_records)
from .format import (MAX_C_THOUGHT, MODES, Example, FormatConfig, SpecialIds, Templated, TokenizedRecord,
                     check_tokenization_invariant, decode, encode_text, format_record, format_tokenized,
                     latent_counts, add_latent_special_ids, question_ids, tokenize_record)
from .collate import collate, collate_prompts, make_batch
from .chains import chain_records
from .synth import synth_record, synth_records
from .stats import TextTokenizer, stats_report, step_distribution

__all__ = [
    'FORMATS', 'Record', 'detect_format', 'load_records', 'normalize_answer', 'parse_gsm8k_answer',
    'parse_icot_line', 'save_records', 'COCONUT_COMMIT', 'GSM8K_URLS', 'ICOT_COMMIT', 'PRONTOQA_COMMIT',
    'PRONTOQA_GENERATE', 'PRONTOQA_REPO', 'PRONTOQA_SPLITS', 'PROSQA_URLS', 'download_gsm8k',
    'download_prontoqa', 'download_prosqa', 'fetch', 'prontoqa_records', 'MAX_C_THOUGHT', 'MODES',
    'Example', 'FormatConfig', 'SpecialIds', 'Templated', 'TokenizedRecord', 'check_tokenization_invariant',
    'decode', 'encode_text', 'question_ids', 'format_record', 'format_tokenized', 'latent_counts', 'add_latent_special_ids', 'tokenize_record',
    'collate', 'collate_prompts', 'make_batch', 'synth_record', 'synth_records', 'chain_records', 'TextTokenizer', 'stats_report',
    'step_distribution',
]
