//! `gpt2 serve` driven by a real OpenAI client that nobody on this project
//! wrote (`async-openai`), through its typed API: if a response does not
//! have the shape OpenAI's API defines, the client's types refuse it. The
//! server is the binary with the tiny synthetic model on an ephemeral
//! loopback port, as in tests/serve.rs; what it generates is checked
//! against the engine in-process.
//!
//! At the end, the raw-HTTP cases such a client cannot send (bodies that are
//! not a JSON object, or not UTF-8, or that arrive chunked past the limit),
//! beside those tests/serve.rs and tests/serve_hardening.rs already cover
//! (truncated JSON, a wrong `Content-Type`, a declared length over the
//! limit, `Expect: 100-continue`).

mod common;

use std::future::Future;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;

use async_openai::config::OpenAIConfig;
use async_openai::error::{ApiErrorResponse, OpenAIError};
use async_openai::types::chat::{
    ChatCompletionRequestSystemMessage, ChatCompletionRequestUserMessage, ChatCompletionStreamOptions,
    CompletionFinishReason, CreateChatCompletionRequest, CreateChatCompletionRequestArgs, FinishReason,
    Logprobs, Prompt, Role,
};
use async_openai::types::completions::{
    CreateCompletionRequest, CreateCompletionRequestArgs, CreateCompletionResponse,
};
use async_openai::Client;
use futures::StreamExt;
use serde_json::{json, Value};

use common::server::{post_json, post_raw, ServerProcess, PATIENCE};
use common::synth_dir;
use gpt2::logprobs::TokenLogprob;
use gpt2::synth::Preset;
use gpt2::tokenizer::{Gpt2Tokenizer, EOS_TOKEN};
use gpt2::{GenerateOptions, Gpt2Model, Scheduler, SchedulerConfig};

const PROMPT: &str = "The quick brown fox jumps over";
const MODEL: &str = "synth-tiny-0";

fn tiny_server(extra: &[&str]) -> ServerProcess {
    let dir = synth_dir(Preset::Tiny, 0).to_str().unwrap().to_string();
    let mut args = vec!["--weights", dir.as_str()];
    args.extend_from_slice(extra);
    ServerProcess::ready(&args, &[])
}

/// The client pointed at the server, as a user points it at any
/// OpenAI-compatible one: the base URL with `/v1`, and a key (the server
/// runs without one, so any key does).
fn client(server: &ServerProcess) -> Client<OpenAIConfig> {
    let config = OpenAIConfig::new()
        .with_api_base(server.url("/v1"))
        .with_api_key("sk-dummy");
    Client::with_config(config)
}

/// `f`, failed past the patience: a hang fails the test instead of stalling it.
async fn within<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, f)
        .await
        .expect("the server answered within the patience")
}

/// The engine in-process, as the server runs it (the scheduler, f32).
struct Reference {
    sched: Scheduler,
    tok: Gpt2Tokenizer,
}

impl Reference {
    fn new() -> Self {
        let dir = synth_dir(Preset::Tiny, 0);
        let model = Gpt2Model::load_with(&dir, gpt2::Dtype::F32).unwrap();
        let sched = Scheduler::new(Arc::new(model), SchedulerConfig::default()).unwrap();
        Reference {
            sched,
            tok: Gpt2Tokenizer::builtin(),
        }
    }

    fn ids(&self, text: &str) -> Vec<u32> {
        self.tok.encode(text).unwrap()
    }

    /// `max_tokens` greedy tokens after `prompt`, with `logprobs` alternatives.
    fn greedy(&self, prompt: &str, max_tokens: usize, logprobs: Option<usize>) -> Greedy {
        let opts = GenerateOptions {
            logprobs,
            ..GenerateOptions::greedy(max_tokens)
        };
        let g = self.sched.generate(self.ids(prompt), opts).unwrap();
        // The server stops there, and the client cannot send `ignore_eos`.
        assert!(!g.tokens.contains(&EOS_TOKEN), "{prompt:?} reaches <|endoftext|>");
        Greedy {
            text: self.tok.decode(&g.tokens).unwrap(),
            logprobs: g.logprobs,
        }
    }

    /// The log-probabilities of `prompt`'s tokens after the first.
    fn prompt_logprobs(&self, prompt: &str, top: usize) -> Vec<TokenLogprob> {
        let opts = GenerateOptions {
            prompt_logprobs: Some(top),
            ..GenerateOptions::greedy(0)
        };
        self.sched
            .generate(self.ids(prompt), opts)
            .unwrap()
            .prompt_logprobs
    }
}

struct Greedy {
    text: String,
    logprobs: Vec<TokenLogprob>,
}

/// A greedy completion request: temperature 0, so the server's text is the
/// engine's greedy one (no `ignore_eos` in OpenAI's API: the prompts here
/// were checked to reach `max_tokens` before `<|endoftext|>`, and the
/// reference asserts it).
fn greedy_request(prompt: impl Into<Prompt>, max_tokens: u32) -> CreateCompletionRequestArgs {
    let mut args = CreateCompletionRequestArgs::default();
    args.model(MODEL)
        .prompt(prompt)
        .max_tokens(max_tokens)
        .temperature(0.0);
    args
}

/// The typed API error of a refused request.
#[track_caller]
fn api_error<T: std::fmt::Debug>(result: Result<T, OpenAIError>) -> ApiErrorResponse {
    match result {
        Err(OpenAIError::ApiError(e)) => e,
        other => panic!("expected the client's ApiError, got {other:?}"),
    }
}

/// A 400 naming `param`, in OpenAI's error shape as the client reads it.
#[track_caller]
fn assert_bad_param<T: std::fmt::Debug>(result: Result<T, OpenAIError>, param: &str) {
    let e = api_error(result);
    assert_eq!(e.status_code.as_u16(), 400, "{e}");
    assert_eq!(e.api_error.param.as_deref(), Some(param), "{e}");
    assert_eq!(
        e.api_error.r#type.as_deref(),
        Some("invalid_request_error"),
        "{e}"
    );
    assert!(e.api_error.message.contains(param), "{e}");
}

async fn complete(
    client: &Client<OpenAIConfig>,
    request: CreateCompletionRequest,
) -> CreateCompletionResponse {
    within(client.completions().create(request))
        .await
        .expect("the completion succeeds")
}

/// Every chunk of a streamed completion, up to `[DONE]`.
async fn complete_streamed(
    client: &Client<OpenAIConfig>,
    request: CreateCompletionRequest,
) -> Vec<CreateCompletionResponse> {
    within(async {
        let stream = client.completions().create_stream(request).await.unwrap();
        stream
            .map(|c| c.expect("a chunk the client's types accept"))
            .collect()
            .await
    })
    .await
}

#[tokio::test]
async fn completion_text_and_usage_are_the_engines() {
    let server = tiny_server(&[]);
    let client = client(&server);
    let reference = Reference::new();
    let want = reference.greedy(PROMPT, 12, None);

    let r = complete(&client, greedy_request(PROMPT, 12).build().unwrap()).await;
    assert_eq!((r.object.as_str(), r.model.as_str()), ("text_completion", MODEL));
    assert!(r.id.starts_with("cmpl-"), "{}", r.id);
    assert_eq!(r.choices.len(), 1);
    let choice = &r.choices[0];
    assert_eq!(choice.index, 0);
    assert_eq!(choice.text, want.text);
    assert_eq!(choice.finish_reason, Some(CompletionFinishReason::Length));
    assert_eq!(choice.logprobs, None);
    let usage = r.usage.expect("usage");
    let prompt_tokens = reference.ids(PROMPT).len() as u32;
    assert_eq!(
        (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens),
        (prompt_tokens, 12, prompt_tokens + 12)
    );

    // Token ids for a prompt give the same.
    let ids = Prompt::IntegerArray(reference.ids(PROMPT));
    let r = complete(&client, greedy_request(ids, 12).build().unwrap()).await;
    assert_eq!(r.choices[0].text, want.text);
}

#[tokio::test]
async fn streamed_completion_ends_with_a_usage_chunk() {
    let server = tiny_server(&[]);
    let client = client(&server);
    let reference = Reference::new();
    let want = reference.greedy(PROMPT, 10, None);

    let mut request = greedy_request(PROMPT, 10);
    request.stream_options(ChatCompletionStreamOptions {
        include_usage: Some(true),
        include_obfuscation: None,
    });
    let chunks = complete_streamed(&client, request.build().unwrap()).await;
    let (last, text_chunks) = chunks.split_last().expect("chunks");
    // As OpenAI defines it: the last chunk has no choices and the usage,
    // every other has `usage: null`.
    assert!(last.choices.is_empty(), "{last:?}");
    let usage = last.usage.as_ref().expect("usage in the last chunk");
    let prompt_tokens = reference.ids(PROMPT).len() as u32;
    assert_eq!(
        (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens),
        (prompt_tokens, 10, prompt_tokens + 10)
    );
    assert!(text_chunks.iter().all(|c| c.usage.is_none()));
    assert!(text_chunks
        .iter()
        .all(|c| c.choices.len() == 1 && c.choices[0].index == 0));
    let text: String = text_chunks.iter().map(|c| c.choices[0].text.as_str()).collect();
    assert_eq!(text, want.text);
    let finishes: Vec<_> = text_chunks.iter().map(|c| c.choices[0].finish_reason).collect();
    assert_eq!(finishes.last(), Some(&Some(CompletionFinishReason::Length)));
    assert!(finishes[..finishes.len() - 1].iter().all(Option::is_none));
    assert!(text_chunks
        .iter()
        .all(|c| c.object == "text_completion" && c.id == last.id));

    // Without `include_usage`, no usage anywhere.
    let chunks = complete_streamed(&client, greedy_request(PROMPT, 10).build().unwrap()).await;
    assert!(chunks.iter().all(|c| c.usage.is_none() && c.choices.len() == 1));
}

/// The legacy completions `logprobs` of one choice: four lists of one
/// length; each `top_logprobs` entry an object of at most `n + 1` tokens
/// (OpenAI: the N alternatives and the sampled token) holding the token.
#[track_caller]
fn assert_legacy_shape(lp: &Logprobs, tokens: usize, n: usize) {
    assert_eq!(lp.tokens.len(), tokens, "{lp:?}");
    assert_eq!(lp.token_logprobs.len(), tokens, "{lp:?}");
    assert_eq!(lp.top_logprobs.len(), tokens, "{lp:?}");
    assert_eq!(lp.text_offset.len(), tokens, "{lp:?}");
    for (i, top) in lp.top_logprobs.iter().enumerate() {
        let Some(lp_i) = lp.token_logprobs[i] else {
            assert!(top.is_null(), "token {i}: {top}");
            continue;
        };
        let top = top.as_object().unwrap_or_else(|| panic!("token {i}: {top}"));
        assert!(!top.is_empty() && top.len() <= n + 1, "token {i}: {top:?}");
        let own = top.get(&lp.tokens[i]).and_then(Value::as_f64);
        let own = own.unwrap_or_else(|| panic!("token {i}: {:?} not in {top:?}", lp.tokens[i]));
        assert!((own - lp_i as f64).abs() < 1e-6, "token {i}: {top:?} {lp_i}");
    }
}

/// Where each token's text starts in their concatenation, in characters
/// (what Python's `text[offset:]` counts, as `text_offset` does).
fn offsets(tokens: &[String]) -> Vec<u32> {
    tokens
        .iter()
        .scan(0, |at, t| {
            let here = *at;
            *at += t.chars().count() as u32;
            Some(here)
        })
        .collect()
}

#[tokio::test]
async fn logprobs_and_echo_have_openais_shape_and_the_engines_numbers() {
    let server = tiny_server(&[]);
    let client = client(&server);
    let reference = Reference::new();
    let want = reference.greedy(PROMPT, 6, Some(2));

    let mut request = greedy_request(PROMPT, 6);
    request.logprobs(2u8);
    let r = complete(&client, request.build().unwrap()).await;
    let choice = &r.choices[0];
    assert_eq!(choice.text, want.text);
    let lp = choice.logprobs.as_ref().expect("logprobs");
    assert_legacy_shape(lp, 6, 2);
    assert_eq!(want.logprobs.len(), 6);
    for (i, (got, want)) in lp.token_logprobs.iter().zip(&want.logprobs).enumerate() {
        let got = got.expect("a generated token's logprob");
        assert!(
            (got - want.logprob).abs() < 1e-5,
            "token {i}: {got} vs {}",
            want.logprob
        );
        // Greedy: the token is the likeliest of its alternatives.
        let top = lp.top_logprobs[i].as_object().unwrap();
        assert!(
            top.values().all(|v| v.as_f64().unwrap() <= got as f64 + 1e-6),
            "{top:?}"
        );
    }
    assert_eq!(lp.text_offset, offsets(&lp.tokens));
    assert_eq!(lp.tokens.concat(), want.text);

    // Scoring a text, as evaluation harnesses do: the prompt echoed, its
    // tokens scored, nothing generated; the first token has no logprob.
    let mut request = greedy_request(PROMPT, 0);
    request.logprobs(2u8).echo(true);
    let r = complete(&client, request.build().unwrap()).await;
    let choice = &r.choices[0];
    assert_eq!(choice.text, PROMPT);
    let ids = reference.ids(PROMPT);
    let lp = choice.logprobs.as_ref().expect("logprobs");
    assert_legacy_shape(lp, ids.len(), 2);
    assert_eq!(lp.token_logprobs[0], None);
    assert_eq!(lp.tokens.concat(), PROMPT);
    let scored = reference.prompt_logprobs(PROMPT, 2);
    assert_eq!(scored.len(), ids.len() - 1);
    for (i, (got, want)) in lp.token_logprobs[1..].iter().zip(&scored).enumerate() {
        let got = got.expect("a prompt token's logprob");
        assert!(
            (got - want.logprob).abs() < 1e-5,
            "token {}: {got} vs {}",
            i + 1,
            want.logprob
        );
    }
    assert_eq!(lp.text_offset, offsets(&lp.tokens));
    let usage = r.usage.unwrap();
    assert_eq!(
        (usage.prompt_tokens, usage.completion_tokens),
        (ids.len() as u32, 0)
    );

    // Echo with generated tokens: the prompt's lists, then the generation's.
    let mut request = greedy_request(PROMPT, 3);
    request.logprobs(1u8).echo(true);
    let r = complete(&client, request.build().unwrap()).await;
    let choice = &r.choices[0];
    let three = reference.greedy(PROMPT, 3, None);
    assert_eq!(choice.text, format!("{PROMPT}{}", three.text));
    assert_legacy_shape(choice.logprobs.as_ref().unwrap(), ids.len() + 3, 1);
}

#[tokio::test]
async fn n_choices_of_a_seeded_request_are_reproducible() {
    let server = tiny_server(&[]);
    let client = client(&server);
    let prompt_tokens = Gpt2Tokenizer::builtin().encode(PROMPT).unwrap().len() as u32;
    let request = CreateCompletionRequestArgs::default()
        .model(MODEL)
        .prompt(PROMPT)
        .max_tokens(8u32)
        .temperature(1.0)
        .n(3u8)
        .seed(1234)
        .build()
        .unwrap();
    let first = complete(&client, request.clone()).await;
    let indexes: Vec<u32> = first.choices.iter().map(|c| c.index).collect();
    assert_eq!(indexes, [0, 1, 2]);
    // Each choice its own sample (its own seed), so not all alike.
    let texts: Vec<&str> = first.choices.iter().map(|c| c.text.as_str()).collect();
    assert!(texts[0] != texts[1] || texts[1] != texts[2], "{texts:?}");
    let usage = first.usage.as_ref().unwrap();
    let generated: u32 = first.choices.len() as u32 * 8;
    // Stopped early only at `<|endoftext|>`: then fewer tokens, never more.
    assert!(usage.completion_tokens <= generated, "{usage:?}");
    assert_eq!(usage.prompt_tokens, prompt_tokens, "the prompt counted once");
    assert_eq!(usage.total_tokens, usage.prompt_tokens + usage.completion_tokens);

    let again = complete(&client, request).await;
    assert_eq!(again.choices, first.choices);
}

#[tokio::test]
async fn a_batch_of_prompts_gets_its_choices_in_index_order() {
    let server = tiny_server(&[]);
    let client = client(&server);
    let reference = Reference::new();
    let prompts = ["Once upon a time", "The capital of France is"];
    let want: Vec<String> = prompts
        .iter()
        .map(|p| reference.greedy(p, 5, None).text)
        .collect();

    let batch = Prompt::StringArray(prompts.map(String::from).to_vec());
    let r = complete(&client, greedy_request(batch.clone(), 5).build().unwrap()).await;
    let got: Vec<(u32, &str)> = r.choices.iter().map(|c| (c.index, c.text.as_str())).collect();
    assert_eq!(got, [(0, want[0].as_str()), (1, want[1].as_str())]);
    let prompt_tokens: usize = prompts.iter().map(|p| reference.ids(p).len()).sum();
    let usage = r.usage.unwrap();
    assert_eq!(
        (usage.prompt_tokens, usage.completion_tokens),
        (prompt_tokens as u32, 10)
    );

    // With `n`, prompt i's choices are indexes i·n .. i·n + n (OpenAI's order).
    let mut request = greedy_request(batch, 5);
    request.n(2u8);
    let r = complete(&client, request.build().unwrap()).await;
    let got: Vec<(u32, &str)> = r.choices.iter().map(|c| (c.index, c.text.as_str())).collect();
    let (a, b) = (want[0].as_str(), want[1].as_str());
    assert_eq!(got, [(0, a), (1, a), (2, b), (3, b)]);

    // Token-id prompts too.
    let ids = Prompt::ArrayOfIntegerArray(prompts.iter().map(|p| reference.ids(p)).collect());
    let r = complete(&client, greedy_request(ids, 5).build().unwrap()).await;
    let got: Vec<&str> = r.choices.iter().map(|c| c.text.as_str()).collect();
    assert_eq!(got, [a, b]);
}

fn chat_request(stream: bool) -> CreateChatCompletionRequest {
    CreateChatCompletionRequestArgs::default()
        .model(MODEL)
        .messages([
            ChatCompletionRequestSystemMessage::from("You are a fox.").into(),
            ChatCompletionRequestUserMessage::from("What do you jump over?").into(),
        ])
        .max_completion_tokens(12u32)
        .temperature(0.0)
        .stream(stream)
        .build()
        .unwrap()
}

#[tokio::test]
async fn chat_completions_streamed_and_not_agree() {
    let server = tiny_server(&[]);
    let client = client(&server);

    let whole = within(client.chat().create(chat_request(false)))
        .await
        .expect("the chat completion succeeds");
    assert_eq!(whole.object, "chat.completion");
    assert!(whole.id.starts_with("chatcmpl-"), "{}", whole.id);
    assert_eq!((whole.model.as_str(), whole.choices.len()), (MODEL, 1));
    let choice = &whole.choices[0];
    assert_eq!((choice.index, choice.message.role), (0, Role::Assistant));
    let content = choice.message.content.clone().expect("content");
    assert!(!content.is_empty());
    let usage = whole.usage.clone().expect("usage");
    assert_eq!(usage.total_tokens, usage.prompt_tokens + usage.completion_tokens);
    assert!(
        usage.completion_tokens >= 1 && usage.completion_tokens <= 12,
        "{usage:?}"
    );
    let finish = choice.finish_reason.expect("finish_reason");
    assert_eq!(
        finish == FinishReason::Length,
        usage.completion_tokens == 12,
        "{finish:?} {usage:?}"
    );

    let mut request = chat_request(true);
    request.stream_options = Some(ChatCompletionStreamOptions {
        include_usage: Some(true),
        include_obfuscation: None,
    });
    let chunks: Vec<_> = within(async {
        let stream = client.chat().create_stream(request).await.unwrap();
        stream
            .map(|c| c.expect("a chunk the client's types accept"))
            .collect::<Vec<_>>()
            .await
    })
    .await;
    let (last, deltas) = chunks.split_last().expect("chunks");
    assert!(last.choices.is_empty(), "{last:?}");
    assert_eq!(last.usage.as_ref(), Some(&usage));
    assert!(deltas
        .iter()
        .all(|c| c.object == "chat.completion.chunk" && c.choices.len() == 1));
    // The role comes first, once; the content pieces join to the whole.
    let roles: Vec<Option<Role>> = deltas.iter().map(|c| c.choices[0].delta.role).collect();
    assert_eq!(roles[0], Some(Role::Assistant));
    assert!(roles[1..].iter().all(Option::is_none), "{roles:?}");
    let streamed: String = deltas
        .iter()
        .filter_map(|c| c.choices[0].delta.content.as_deref())
        .collect();
    assert_eq!(streamed, content);
    let finishes: Vec<_> = deltas.iter().map(|c| c.choices[0].finish_reason).collect();
    assert_eq!(finishes.last(), Some(&Some(finish)));
    assert!(finishes[..finishes.len() - 1].iter().all(Option::is_none));
}

#[tokio::test]
async fn models_list_and_retrieve_the_served_model() {
    let server = tiny_server(&[]);
    let client = client(&server);
    let list = within(client.models().list()).await.unwrap();
    assert_eq!(list.object, "list");
    let ids: Vec<&str> = list.data.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, [MODEL]);
    assert_eq!(list.data[0].object, "model");
    let one = within(client.models().retrieve(MODEL)).await.unwrap();
    assert_eq!(one, list.data[0]);
    let e = api_error(within(client.models().retrieve("gpt-4")).await);
    assert_eq!(e.status_code.as_u16(), 404, "{e}");
    assert_eq!(e.api_error.code.as_deref(), Some("model_not_found"), "{e}");
}

#[tokio::test]
async fn refusals_come_back_as_the_clients_api_error_naming_the_parameter() {
    let server = tiny_server(&[]);
    let client = client(&server);
    let completions = client.completions();
    let mut request = greedy_request(PROMPT, 4);
    request.n(0u8);
    assert_bad_param(within(completions.create(request.build().unwrap())).await, "n");
    let mut request = greedy_request(PROMPT, 4);
    request.logprobs(21u8);
    assert_bad_param(
        within(completions.create(request.build().unwrap())).await,
        "logprobs",
    );
    let mut request = greedy_request(PROMPT, 4);
    request.temperature(-1.0);
    assert_bad_param(
        within(completions.create(request.build().unwrap())).await,
        "temperature",
    );
    // A streamed request is refused before its stream starts.
    let mut request = greedy_request(PROMPT, 4);
    request.top_p(2.0);
    let r = within(completions.create_stream(request.build().unwrap())).await;
    assert_bad_param(r.map(|_| ()), "top_p");
    // Another model than the one served.
    let mut other = greedy_request(PROMPT, 4).build().unwrap();
    other.model = "gpt-4".into();
    let e = api_error(within(completions.create(other)).await);
    assert_eq!(
        (e.status_code.as_u16(), e.api_error.param.as_deref()),
        (404, Some("model"))
    );
}

#[tokio::test]
async fn chat_refusals_name_the_parameter() {
    let server = tiny_server(&[]);
    let client = client(&server);
    let mut request = chat_request(false);
    request.n = Some(0);
    assert_bad_param(within(client.chat().create(request)).await, "n");
    let mut request = chat_request(false);
    request.messages.clear();
    assert_bad_param(within(client.chat().create(request)).await, "messages");
    let mut request = chat_request(false);
    request.top_logprobs = Some(21);
    request.logprobs = Some(true);
    assert_bad_param(within(client.chat().create(request)).await, "top_logprobs");
}

/// `POST route` over a fresh connection with `headers` and `body`, written
/// whole, and the response's status and body (read to the close).
fn raw_post(base: &str, route: &str, headers: &str, body: &[u8]) -> (u16, String) {
    let addr = base.strip_prefix("http://").unwrap();
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let head = format!("POST {route} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{headers}\r\n");
    let mut request = head.into_bytes();
    request.extend_from_slice(body);
    // The server may answer, and close, before it has read it all.
    let _ = s.write_all(&request);
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply);
    let reply = String::from_utf8_lossy(&reply).into_owned();
    let status = reply
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {reply:?}"));
    let body = reply.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_string();
    (status, body)
}

#[test]
fn bodies_no_client_would_send_are_refused_by_name() {
    let server = tiny_server(&["--max-body-bytes", "4096"]);
    for route in ["/v1/completions", "/v1/chat/completions"] {
        let url = server.url(route);
        // Valid JSON, but not an object of request fields.
        for body in ["[]", "[{\"prompt\": \"a\"}]", "\"a\"", "null", "7", "true"] {
            let r = post_raw(&url, "application/json", body);
            assert_eq!(r.status, 400, "{route} {body}: {}", r.text);
            assert_eq!(
                r.json["error"]["code"], "invalid_json",
                "{route} {body}: {}",
                r.text
            );
            assert!(
                r.json["error"]["message"].as_str().unwrap().contains("object"),
                "{}",
                r.text
            );
        }
        // Empty, trailing bytes after the object, nested past serde_json's
        // depth limit of 128 (refused, not a stack overflow), or not UTF-8.
        let deep = format!("{}{}", "[".repeat(500), "]".repeat(500));
        for body in ["", "{\"prompt\": \"a\"} x", deep.as_str()] {
            let r = post_raw(&url, "application/json", body);
            assert_eq!(r.status, 400, "{route} {:.40}: {}", body, r.text);
            assert_eq!(r.json["error"]["code"], "invalid_json", "{}", r.text);
        }
        let not_utf8 = b"{\"prompt\": \"\xff\xfe\"}";
        let headers = format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            not_utf8.len()
        );
        let (status, body) = raw_post(&server.base, route, &headers, not_utf8);
        assert_eq!(status, 400, "{body}");
        assert!(body.contains("invalid_json"), "{body}");
        // No `Content-Type` at all.
        let json = br#"{"prompt": "a"}"#;
        let headers = format!("Content-Length: {}\r\n", json.len());
        let (status, body) = raw_post(&server.base, route, &headers, json);
        assert_eq!(status, 400, "{body}");
        assert!(body.contains("Content-Type"), "{body}");
        // A chunked body (no length declared) is cut off at the limit.
        let headers = "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n";
        let mut chunked = Vec::new();
        for _ in 0..5 {
            chunked.extend_from_slice(format!("400\r\n{}\r\n", " ".repeat(0x400)).as_bytes());
        }
        chunked.extend_from_slice(b"0\r\n\r\n");
        let (status, body) = raw_post(&server.base, route, headers, &chunked);
        assert_eq!(status, 413, "{body}");
        assert!(body.contains("4096"), "{body}");
    }
    // The server still answers.
    let ok = post_json(
        &server.url("/v1/completions"),
        &json!({"prompt": "a", "max_tokens": 1}),
    );
    assert_eq!(ok.status, 200, "{}", ok.text);
    assert!(matches!(ok.json["choices"][0]["text"], Value::String(_)));
}
