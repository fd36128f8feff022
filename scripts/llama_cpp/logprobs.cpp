// tyr-logprobs: per-token log-probabilities of a given token sequence under a GGUF model.
//
// Usage: tyr-logprobs MODEL.gguf ID0 ID1 ... IDn
// Prints n lines "i id logprob": log p(ID_i | ID_0 .. ID_{i-1}) for i = 1..n, computed in float64
// from llama.cpp's logits (float32 K/V cache). Used by tests/test_gguf_export.py to compare llama.cpp with tyr-jax on
// exactly the same token ids (no tokenizer in between).
#include "llama.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

static void quiet_log(ggml_log_level level, const char * text, void *) {
    if (level >= GGML_LOG_LEVEL_ERROR) {
        fputs(text, stderr);
    }
}

int main(int argc, char ** argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s MODEL.gguf ID0 ID1 [ID2 ...]\n", argv[0]);
        return 2;
    }
    std::vector<llama_token> ids;
    for (int i = 2; i < argc; ++i) {
        ids.push_back((llama_token) atoi(argv[i]));
    }
    const int n = (int) ids.size();

    llama_log_set(quiet_log, nullptr);
    llama_backend_init();
    llama_model_params mparams = llama_model_default_params();
    mparams.n_gpu_layers = 0;
    llama_model * model = llama_model_load_from_file(argv[1], mparams);
    if (model == nullptr) {
        fprintf(stderr, "tyr-logprobs: llama.cpp could not load %s\n", argv[1]);
        return 1;
    }
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));

    llama_context_params cparams = llama_context_default_params();
    cparams.n_ctx = n;
    cparams.n_batch = n;
    cparams.n_ubatch = n;
    cparams.no_perf = true;
    // float32 K/V cache and no flash attention: llama.cpp's defaults (f16 cache) cost ~1e-3 in log p.
    cparams.type_k = GGML_TYPE_F32;
    cparams.type_v = GGML_TYPE_F32;
    cparams.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    llama_context * ctx = llama_init_from_model(model, cparams);
    if (ctx == nullptr) {
        fprintf(stderr, "tyr-logprobs: could not create a context of %d tokens\n", n);
        return 1;
    }

    llama_batch batch = llama_batch_init(n, 0, 1);
    for (int i = 0; i < n; ++i) {
        batch.token[i] = ids[i];
        batch.pos[i] = i;
        batch.n_seq_id[i] = 1;
        batch.seq_id[i][0] = 0;
        batch.logits[i] = 1;
    }
    batch.n_tokens = n;
    if (llama_decode(ctx, batch) != 0) {
        fprintf(stderr, "tyr-logprobs: llama_decode failed\n");
        return 1;
    }
    for (int i = 1; i < n; ++i) {
        const float * logits = llama_get_logits_ith(ctx, i - 1);
        double peak = logits[0];
        for (int v = 1; v < n_vocab; ++v) {
            peak = logits[v] > peak ? logits[v] : peak;
        }
        double total = 0.0;
        for (int v = 0; v < n_vocab; ++v) {
            total += std::exp((double) logits[v] - peak);
        }
        const double logprob = (double) logits[ids[i]] - peak - std::log(total);
        printf("%d %d %.9g\n", i, ids[i], logprob);
    }
    llama_batch_free(batch);
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
