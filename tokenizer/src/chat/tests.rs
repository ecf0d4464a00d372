//! Unit tests for chat normalisation and template helpers.

use serde_json::json;

use super::{normalize_messages, strftime};
use crate::{ChatTemplateInput, Tokenizer, TokenizerError};

#[test]
fn content_parts_join_with_newline() {
    let msgs = json!([
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "extra": 1},
        {"role": "assistant", "content": null, "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "r", "name": "f"},
    ]);
    let n = normalize_messages(&msgs).expect("normalize");
    assert_eq!(n[0].to_json(), json!({"role": "user", "content": "a\nb"}));
    assert_eq!(n[1].to_json()["content"], "");
    assert_eq!(n[1].to_json()["tool_calls"][0]["function"]["arguments"], json!({"x": 1}));
    assert_eq!(n[2].to_json(), json!({"role": "tool", "content": "r", "name": "f", "tool_call_id": "c1"}));
    // Keys keep vLLM's order (templates that iterate a message see it).
    let keys: Vec<String> = n[2].to_json().as_object().unwrap().keys().cloned().collect();
    assert_eq!(keys, ["role", "content", "name", "tool_call_id"]);
}

#[test]
fn bad_messages_name_the_path() {
    // (messages, expected error text)
    let cases = [
        (json!({"role": "user"}), "messages: expected an array of messages"),
        (json!([1]), "messages[0]: expected an object"),
        (json!([{"content": "x"}]), "messages[0]: missing `role`"),
        (json!([{"role": 5, "content": "x"}]), "messages[0].role: expected a string"),
        (
            json!([{"role": "user", "content": 5}]),
            "messages[0].content: expected a string, null or an array of content parts",
        ),
        (
            json!([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}, {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "http://x"}}]}]),
            "messages[2].content: unsupported content part type `image_url`",
        ),
        (json!([{"role": "user", "content": [{"type": "text"}]}]), "messages[0].content[0].text: expected a string"),
        (
            json!([{"role": "user", "content": [{"text": "a"}]}]),
            "messages[0].content[0]: content part without a string `type`",
        ),
        (json!([{"role": "user", "content": [7]}]), "messages[0].content[0]: expected a content part object"),
        (
            json!([{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}]),
            "messages[0].tool_calls[0].function.arguments: invalid JSON",
        ),
    ];
    let tok = Tokenizer::builtin();
    for (msgs, want) in cases {
        let err = tok.apply_chat_template(&ChatTemplateInput::new(&msgs)).expect_err(want);
        assert!(matches!(err, TokenizerError::Messages { .. }), "{err:?}");
        assert!(err.to_string().starts_with(want), "{err} vs {want}");
    }
}

#[test]
fn builtin_chatml() {
    let tok = Tokenizer::builtin();
    let msgs = json!([{"role": "user", "content": " bado"}]);
    let mut req = ChatTemplateInput::new(&msgs);
    let s = tok.apply_chat_template(&req).expect("render");
    assert_eq!(s, "<|im_start|>user\n bado<|im_end|>\n<|im_start|>assistant\n");
    let ids = tok.encode_chat(&req).expect("encode");
    assert_eq!(
        ids,
        [1, 3 + b'u' as u32, 3 + b's' as u32, 3 + b'e' as u32, 3 + b'r' as u32, 3 + 10, 259 + 2 * 103, 2, 3 + 10, 1]
            .iter()
            .copied()
            .chain(tok.encode("assistant\n", false).expect("encode"))
            .collect::<Vec<_>>()
    );
    req.add_generation_prompt = false;
    assert_eq!(tok.apply_chat_template(&req).expect("render"), "<|im_start|>user\n bado<|im_end|>\n");
    req.continue_final_message = true;
    assert_eq!(tok.apply_chat_template(&req).expect("render"), "<|im_start|>user\n bado");
    req.add_generation_prompt = true;
    let err = tok.apply_chat_template(&req).expect_err("both flags");
    assert!(matches!(err, TokenizerError::InvalidRequest { .. }), "{err}");
}

#[test]
fn kwargs_override_flags() {
    let tok = Tokenizer::builtin();
    let msgs = json!([{"role": "user", "content": "x"}]);
    let kwargs = json!({"add_generation_prompt": false});
    let req = ChatTemplateInput { chat_template_kwargs: kwargs.as_object(), ..ChatTemplateInput::new(&msgs) };
    assert_eq!(tok.apply_chat_template(&req).expect("render"), "<|im_start|>user\nx<|im_end|>\n");
}

fn render(template: &str, ctx: serde_json::Value) -> Result<String, TokenizerError> {
    let t = super::ChatTemplate::new(template.to_string(), "test", vec![("bos_token", "<s>".into())])?;
    let msgs = ctx["messages"].clone();
    let kwargs = ctx.as_object().cloned().unwrap_or_default();
    t.render(&ChatTemplateInput { chat_template_kwargs: Some(&kwargs), ..ChatTemplateInput::new(&msgs) })
}

#[test]
fn template_features() {
    let msgs = json!([{"role": "user", "content": "  Hi There  "}]);
    // (template, expected output) — Python-isms transformers templates rely on.
    let cases = [
        ("{{ bos_token }}{{ messages[0].content.strip() }}", "<s>Hi There"),
        ("{{ messages[0].content | trim | lower }}", "hi there"),
        ("{{ messages[0]['content'].startswith('  Hi') }}", "True"),
        ("{% for k, v in d.items() %}{{ k }}={{ v }};{% endfor %}", "z=1;a=2;"),
        ("{{ d | tojson }}", "{\"z\": 1, \"a\": 2}"),
        ("{{ {'s': '<é>\"\n'} | tojson }}", "{\"s\": \"<é>\\\"\\n\"}"),
        ("{{ d | tojson(indent=2) }}", "{\n  \"z\": 1,\n  \"a\": 2\n}"),
        ("{{ d | tojson(sort_keys=true) }}", "{\"a\": 2, \"z\": 1}"),
        ("{{ [1, 'x', none, true] | tojson }}", "[1, \"x\", null, true]"),
        ("{% if tools is none %}no tools{% endif %}", "no tools"),
        ("{% if foo is defined %}x{% else %}undefined{% endif %}", "undefined"),
        ("{%- for m in messages %}\n  {{ m.role }}\n{%- endfor %}", "  user"),
        ("{% set ns = namespace(n=0) %}{% for i in range(3) %}{% set ns.n = ns.n + i %}{% endfor %}{{ ns.n }}", "3"),
        ("{{ strftime_now('%Y') | length }}", "4"),
        // A message is a mapping like any other, keys in vLLM's order.
        ("{% for k, v in messages[0].items() %}{{ k }}={{ v }};{% endfor %}", "role=user;content=  Hi There  ;"),
        ("{{ messages[0] | tojson }}", "{\"role\": \"user\", \"content\": \"  Hi There  \"}"),
        ("{{ 'content' in messages[0] }} {{ 'name' in messages[0] }}", "True False"),
        ("{{ messages[0] is mapping }} {{ messages[0] | length }}", "True 2"),
        ("{{ messages[0].get('name', 'none') }} {{ messages[0].keys() | join(',') }}", "none role,content"),
        ("{% if messages[0].tool_calls is defined %}y{% else %}n{% endif %}{{ messages[0]['role'] }}", "nuser"),
        ("{{ messages | map(attribute='role') | join }}", "user"),
        // Python's reversed(dict) (Jinja2's `reverse`): the keys, last first.
        ("{{ messages[0] | reverse | join(',') }}", "content,role"),
    ];
    for (tmpl, want) in cases {
        let got =
            render(tmpl, json!({"messages": msgs, "d": {"z": 1, "a": 2}})).unwrap_or_else(|e| panic!("{tmpl}: {e}"));
        assert_eq!(got, want, "{tmpl}");
    }
}

#[test]
fn template_errors() {
    let msgs = json!([{"role": "user", "content": "x"}]);
    let err = render("{{ raise_exception('Only user and assistant roles!') }}", json!({"messages": msgs}))
        .expect_err("raise");
    assert_eq!(err.to_string(), "template error: Only user and assistant roles!");
    let err = render("{% for %}", json!({})).expect_err("syntax");
    assert!(err.to_string().starts_with("template error: test: "), "{err}");
    let err = render("{{ nope.attr }}", json!({"messages": msgs})).expect_err("undefined attr");
    assert!(matches!(err, TokenizerError::Template { .. }), "{err}");
}

#[test]
fn strftime_formats() {
    // 2024-07-26 13:05:09 UTC, a Friday, day 208 of a leap year.
    let t = 1_721_999_109;
    assert_eq!(strftime("%d %b %Y", t), "26 Jul 2024");
    assert_eq!(strftime("%A %B %e, %y %H:%M:%S %I%p %j %% %Q", t), "Friday July 26, 24 13:05:09 01PM 208 % %Q");
    assert_eq!(strftime("%Y-%m-%d %a", 0), "1970-01-01 Thu");
    assert_eq!(strftime("%Y-%m-%d", 951_782_400), "2000-02-29");
}
